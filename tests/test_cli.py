"""The `reelray` command: inspect, make-tiny-model, render (every family's tiny model).

Run in this process through `pipeline.cli.main([...])` (captured stdout and
stderr), and in a subprocess where the process boundary is the point: the
exit status and that a user error prints one line, never a traceback.
Expected figures come from gguf-py's own reader (the oracle for what a file
holds) and from the tiny model's definition in engine/tiny.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from engine.families import FAMILIES as REELRAY_FAMILIES
from engine.model_set import ModelSet, ModelSetError
from engine.render import Engine
from engine.tiny import FAMILIES, TINY_DEFAULTS, TINY_DIT, TINY_T5, file_names, make_tiny_model
from engine.video import probe_mp4, read_mp4
from pipeline.cli import main
from run_helpers import write_png

REPO = Path(__file__).resolve().parents[1]
SHA256 = re.compile(r"frames_sha256 ([0-9a-f]{64})$")
PROGRESS = re.compile(r"denoising \[[#.]{30}\] (\d+)/(\d+) steps")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def gguf_py_view(path: Path) -> tuple[Counter, int]:
    """(tensor count per GGML type name, parameter count) as gguf-py reads the file."""
    reader = GGUFReader(path)
    return Counter(t.tensor_type.name for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def dit_file(model_dir: Path) -> Path:
    return model_dir / file_names("Q8_0")["dit"]


def umt5_file(model_dir: Path) -> Path:
    return model_dir / file_names("Q8_0")["text_encoder"]


# --- inspect ----------------------------------------------------------------------------


def inspect_fields(lines: list[str]) -> dict[str, str]:
    """`  name          value` lines (names padded to 14 columns) as {name: value}."""
    assert all(line.startswith("  ") and len(line) > 16 and line[15] == " " for line in lines), lines
    fields = {line[2:16].strip(): line[16:] for line in lines}
    assert len(fields) == len(lines)  # no name twice
    return fields


def test_inspect_describes_the_tiny_dit(tiny_model, capsys):
    path = dit_file(tiny_model)
    types, n_params = gguf_py_view(path)
    # 2 blocks x (4 self-attention + 4 cross-attention + 2 FFN matrices) are Q8_0, the rest F32.
    assert types == Counter({"Q8_0": 20, "F32": sum(types.values()) - 20})

    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == str(path)
    fields = inspect_fields(lines[1:])
    assert fields["kind"] == "wan_dit" and fields["architecture"] == "wan"
    assert fields["family"] == "Wan2.1 T2V"
    assert fields["tensors"] == f"{sum(types.values())}  (F32: {types['F32']}, Q8_0: 20)"
    assert fields["parameters"] == f"{n_params:,}"
    assert fields["tensor bytes"].endswith(f"(file {path.stat().st_size:,})")
    assert fields["wan config"] == (
        f"custom: dim {TINY_DIT['dim']}, layers {TINY_DIT['num_layers']}, "
        f"heads {TINY_DIT['num_heads']}, ffn {TINY_DIT['ffn_dim']}, in/out channels 16/16, text dim {TINY_T5['dim']}"
    )
    # The defaults a render with this file uses: the tiny model's own, from its metadata.
    assert fields["defaults"] == ", ".join(f"{k} {v}" for k, v in TINY_DEFAULTS.items())


def test_inspect_json_describes_the_tiny_dit(tiny_model, capsys):
    path = dit_file(tiny_model)
    types, n_params = gguf_py_view(path)
    status, out, _ = run_cli(capsys, "inspect", str(path), "--json")
    assert status == 0
    info = json.loads(out)
    assert info["kind"] == "wan_dit" and info["architecture"] == "wan" and info["gguf_version"] == 3
    assert info["tensor_types"] == dict(types) and info["tensors"] == sum(types.values())
    assert info["parameters"] == n_params
    assert info["file_bytes"] == path.stat().st_size > info["tensor_bytes"]
    assert info["config"] == {
        "name": None, "dim": TINY_DIT["dim"], "num_layers": TINY_DIT["num_layers"],
        "num_heads": TINY_DIT["num_heads"], "ffn_dim": TINY_DIT["ffn_dim"], "in_dim": 16, "out_dim": 16,
        "text_dim": TINY_T5["dim"],
    }
    assert info["family"] == "Wan2.1 T2V" and info["family_name"] == "wan2.1-t2v"
    assert info["defaults"] == TINY_DEFAULTS


def test_inspect_describes_the_tiny_umt5_encoder(tiny_model, capsys):
    path = umt5_file(tiny_model)
    types, n_params = gguf_py_view(path)
    assert set(types) == {"F32", "Q8_0"}

    status, out, _ = run_cli(capsys, "inspect", str(path), "--json")
    assert status == 0
    info = json.loads(out)
    assert info["kind"] == "umt5" and info["architecture"] == "t5encoder"
    assert info["tensor_types"] == dict(types) and info["parameters"] == n_params
    assert "config" not in info  # only a Wan DiT has an inferred config to show

    status, out, _ = run_cli(capsys, "inspect", str(path))
    assert status == 0
    assert "  kind          umt5" in out.splitlines()
    assert f"({', '.join(f'{t}: {n}' for t, n in sorted(types.items()))})" in out
    assert "wan config" not in out


def bad_files(tiny_model: Path, tmp_path: Path) -> dict[str, Path]:
    """One file per way a user can point `inspect` at something that is not a whole model file."""
    good = dit_file(tiny_model).read_bytes()
    files = {
        "missing": tmp_path / "nope.gguf",
        "truncated_header": tmp_path / "header.gguf",
        "truncated_data": tmp_path / "data.gguf",
        "not_gguf": tmp_path / "notes.gguf",
        "empty": tmp_path / "empty.gguf",
        "not_safetensors": tmp_path / "notes.safetensors",
    }
    files["truncated_header"].write_bytes(good[:1000])
    files["truncated_data"].write_bytes(good[:-1000])
    files["not_gguf"].write_text("just some text, no magic\n")
    files["empty"].write_bytes(b"")
    files["not_safetensors"].write_text("just some text, no header\n")
    return files


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such file"),
    ("truncated_header", "bytes follow"),
    ("truncated_data", "data lies outside the file"),
    ("not_gguf", "not a GGUF"),
    ("empty", "GGUF"),
    ("not_safetensors", "not a safetensors file"),
])
def test_inspect_refuses_a_bad_file_in_one_line(tiny_model, tmp_path, capsys, case, reason):
    path = bad_files(tiny_model, tmp_path)[case]
    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"reelray: error: {path}") and reason in err


def test_inspect_describes_a_safetensors_vae(tiny_model, capsys):
    # inspect reads a safetensors VAE's header: its kind and which Wan VAE it is.
    path = tiny_model / file_names("Q8_0")["vae"]
    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == str(path)
    fields = inspect_fields(lines[1:])
    assert fields["kind"] == "vae" and fields["family"] == "Wan2.1 VAE"
    assert fields["file bytes"] == f"{path.stat().st_size:,}"
    status, out, _ = run_cli(capsys, "inspect", str(path), "--json")
    info = json.loads(out)
    assert status == 0 and info["kind"] == "vae" and info["family"] == "Wan2.1 VAE" and "config" not in info


def test_inspect_errors_exit_2_with_one_line_and_no_traceback_in_a_process(tiny_model, tmp_path):
    files = bad_files(tiny_model, tmp_path)
    cases = ("missing", "truncated_data", "not_gguf")
    # Started together: each pays the interpreter and torch start-up, not each other's.
    procs = {
        case: subprocess.Popen([sys.executable, "-m", "pipeline.cli", "inspect", str(files[case])], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case in cases
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (case, err)
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("reelray: error: "), (case, err)
        assert "Traceback" not in err


# --- make-tiny-model and render ------------------------------------------------------


def test_make_tiny_model_then_render_writes_a_playable_mp4(tmp_path, capsys):
    model = tmp_path / "model"
    status, out, _ = run_cli(capsys, "make-tiny-model", str(model), "--random")
    assert status == 0
    listed = dict(line.split() for line in out.splitlines())
    assert listed == {role: str(model / name) for role, name in file_names("Q8_0").items()}
    models = ModelSet.from_dir(model)
    assert models.family == "wan2.1-t2v" and models.files["dit"] == model / file_names("Q8_0")["dit"]

    video = tmp_path / "renders" / "fox.mp4"  # the parent directory is created
    status, out, err = run_cli(capsys, "render", "--model", str(model), "--prompt", "a fox",
                               "--seed", "5", "--device", "cpu", "--out", str(video))
    assert status == 0, err
    frames = read_mp4(video)
    assert frames.shape == (9, 64, 64, 3)
    assert probe_mp4(video) == {"frames": 9, "width": 64, "height": 64, "fps": 16.0, "codec": "h264"}
    assert re.fullmatch(rf"{re.escape(str(video))}: wan2\.1-t2v, 9 frames 64x64 at 16 fps, frames_sha256 [0-9a-f]{{64}}\n", out)
    # The progress bar goes to stderr: one line per step when stderr is not a terminal.
    steps = [tuple(map(int, m.groups())) for m in PROGRESS.finditer(err)]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert err.count("\n") == 4
    assert [p.name for p in video.parent.iterdir()] == ["fox.mp4"]  # no temporary file left


def test_render_overrides_steps_size_frames_sampler_and_fps(tiny_model, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    status, out, err = run_cli(
        capsys, "render", "--model", str(tiny_model), "--prompt", "a fox", "--seed", "5", "--device", "cpu",
        "--steps", "2", "--size", "96x32", "--frames", "5", "--sampler", "euler", "--fps", "8",
        "--guidance", "3.5", "--shift", "8", "--out", str(video),
    )
    assert status == 0, err
    assert read_mp4(video).shape == (5, 32, 96, 3)  # --size is WIDTHxHEIGHT
    assert probe_mp4(video)["fps"] == 8.0
    assert [m.groups() for m in PROGRESS.finditer(err)] == [("1", "2"), ("2", "2")]

    # The same job through the Python API: the CLI applied every override.
    engine = Engine(ModelSet.from_dir(tiny_model))
    params = engine.spec.params(steps=2, width=96, height=32, frames=5, sampler="euler", fps=8,
                                guidance=3.5, shift=8.0)
    expected = engine.render("a fox", 5, params).frames_sha256
    assert SHA256.search(out.strip()).group(1) == expected
    assert expected != engine.render("a fox", 5, engine.spec.params(params, sampler="unipc")).frames_sha256


def test_render_negative_prompt_option(tiny_model, tmp_path, capsys):
    shas = []
    for extra in ([], ["--negative-prompt", "blurry, static"]):
        status, out, _ = run_cli(capsys, "render", "--model", str(tiny_model), "--prompt", "a fox", "--seed", "5",
                                 "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "x.mp4"), *extra)
        assert status == 0
        shas.append(SHA256.search(out.strip()).group(1))
    assert shas[0] != shas[1]


@pytest.mark.parametrize("args, reason", [
    (["--size", "65x64"], "width"),
    (["--size", "64x40"], "height"),
    (["--size", "big"], "--size big: expected WIDTHxHEIGHT"),
    (["--frames", "10"], "frames"),
    (["--steps", "0"], "steps"),
])
def test_render_refuses_bad_parameters_in_one_line(tiny_model, tmp_path, capsys, args, reason):
    video = tmp_path / "x.mp4"
    status, out, err = run_cli(capsys, "render", "--model", str(tiny_model), "--prompt", "a fox",
                               "--device", "cpu", "--out", str(video), *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("reelray: error: ") and reason in err
    assert not video.exists()


@pytest.mark.parametrize("args, reason", [(["--size", "65x64"], "width: must be a multiple of 16"), (["--frames", "10"], "frames: must be 4k+1")])
def test_render_refuses_bad_parameters_before_loading_the_model(tiny_model, tmp_path, capsys, monkeypatch, args, reason):
    # A bad --frames must not cost a model load (minutes for a 14B model): the parameters
    # are checked against the model's defaults, which need only the DiT's metadata.
    import engine.render

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the parameters were checked")

    monkeypatch.setattr(engine.render.Engine, "__init__", no_load)
    status, _, err = run_cli(capsys, "render", "--model", str(tiny_model), "--prompt", "a fox",
                             "--device", "cpu", "--out", str(tmp_path / "x.mp4"), *args)
    assert status == 2 and reason in err and "loaded before" not in err


@pytest.mark.parametrize("args, reason", [
    (["--model", "{tmp}/nowhere"], "not a directory"),
    ([], "give --model DIR, or --dit (or --dit-high and --dit-low), --text-encoder and --vae"),
    (["--dit", "{tmp}/a.gguf", "--text-encoder", "{tmp}/b.gguf", "--vae", "{tmp}/c.safetensors"], "file not found"),
])
def test_render_refuses_a_missing_model_in_one_line(tmp_path, capsys, args, reason):
    args = [a.format(tmp=tmp_path) for a in args]
    status, out, err = run_cli(capsys, "render", "--prompt", "a fox", "--out", str(tmp_path / "x.mp4"), *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("reelray: error: ") and reason in err


def test_render_with_files_named_one_by_one(tiny_model, tmp_path, capsys):
    names = file_names("Q8_0")
    status, out, err = run_cli(
        capsys, "render", "--dit", str(tiny_model / names["dit"]), "--text-encoder", str(tiny_model / names["text_encoder"]),
        "--vae", str(tiny_model / names["vae"]), "--prompt", "a fox", "--seed", "5", "--steps", "2", "--device", "cpu",
        "--out", str(tmp_path / "x.mp4"),
    )
    assert status == 0, err
    status, out_dir, _ = run_cli(capsys, "render", "--model", str(tiny_model), "--prompt", "a fox", "--seed", "5",
                                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "y.mp4"))
    assert SHA256.search(out.strip()).group(1) == SHA256.search(out_dir.strip()).group(1)
    assert np.array_equal(read_mp4(tmp_path / "x.mp4"), read_mp4(tmp_path / "y.mp4"))


def test_render_refuses_a_negative_seed_in_one_line_before_loading_the_model(tiny_model, tmp_path, capsys, monkeypatch):
    import engine.render

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the seed was checked")

    monkeypatch.setattr(engine.render.Engine, "__init__", no_load)
    video = tmp_path / "x.mp4"
    status, out, err = run_cli(capsys, "render", "--model", str(tiny_model), "--prompt", "a fox", "--seed", "-1",
                               "--device", "cpu", "--out", str(video))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("reelray: error: --seed -1: ")
    assert "0..2**63-1" in err and "loaded before" not in err
    assert not video.exists()


# --- families: the tiny model of each, recognised from the files; Wan2.2 renders ---------------


FAMILY_FPS = {"wan2.1-t2v": 16, "wan2.1-i2v": 16, "wan2.2-t2v-a14b": 16, "wan2.2-i2v-a14b": 16, "wan2.2-ti2v-5b": 24,
              "wan2.1-vace": 16, "wan2.2-vace-fun-a14b": 16}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny model set of every family, each in its own directory."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        make_tiny_model(root / family, family=family)
    return {family: root / family for family in FAMILIES}


def rendered(out: str, video: Path, family: str) -> tuple[int, int, int, int, str]:
    """(frames, width, height, fps, frames_sha256) from render's one line of output."""
    match = re.fullmatch(rf"{re.escape(str(video))}: {re.escape(family)}, (\d+) frames (\d+)x(\d+) at (\d+) fps, "
                         r"frames_sha256 ([0-9a-f]{64})\n", out)
    assert match, out
    *numbers, sha = match.groups()
    return (*map(int, numbers), sha)


def test_families_are_the_ones_reelray_renders():
    assert set(FAMILIES) == set(REELRAY_FAMILIES) == set(FAMILY_FPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_make_tiny_model_family_writes_files_recognised_as_that_family(tmp_path, capsys, family):
    model = tmp_path / "model"
    status, out, err = run_cli(capsys, "make-tiny-model", str(model), "--family", family)
    assert status == 0, err
    names = file_names("Q8_0", family)
    listed = dict(line.split() for line in out.splitlines())
    assert listed == {role: str(model / name) for role, name in names.items()}
    assert all((model / name).is_file() for name in names.values())

    models = ModelSet.from_dir(model)  # recognised from the files alone, subfolders included
    assert models.family == family
    assert models.files == {role: model / name for role, name in names.items()}
    assert ModelSet.from_dir(model, family=family).files == models.files
    if "a14b" in family:
        # QuantStack's layout: the experts in HighNoise/ and LowNoise/, told apart by those names.
        assert set(models.files) == {"dit_high", "dit_low", "text_encoder", "vae"}
        assert models.files["dit_high"].parent == model / "HighNoise" and "HighNoise" in models.files["dit_high"].name
        assert models.files["dit_low"].parent == model / "LowNoise" and "LowNoise" in models.files["dit_low"].name
    elif family == "wan2.1-i2v":
        assert set(models.files) == {"dit", "text_encoder", "vae", "image_encoder"}
    else:
        assert set(models.files) == {"dit", "text_encoder", "vae"}
    # The tiny model's own defaults: small enough to render in a moment.
    defaults = models.spec.defaults()
    assert (defaults.width, defaults.height, defaults.frames, defaults.steps, defaults.fps) == (
        64, 64, 9, 4, FAMILY_FPS[family])
    # Another family is not what these files are.
    other = next(f for f in FAMILIES if f != family)
    with pytest.raises(ModelSetError):
        ModelSet.from_dir(model, family=other)


@pytest.mark.parametrize("family, image, args", [
    ("wan2.2-t2v-a14b", False, []),
    ("wan2.2-t2v-a14b", False, ["--guidance", "2.5", "--guidance-2", "1.5", "--boundary", "0.95"]),
    ("wan2.2-i2v-a14b", True, []),
    ("wan2.2-ti2v-5b", False, []),
    ("wan2.2-ti2v-5b", True, []),
    ("wan2.1-i2v", True, []),
], ids=["t2v-a14b", "t2v-a14b-expert-flags", "i2v-a14b-image", "ti2v-5b", "ti2v-5b-image", "wan21-i2v-image"])
def test_render_a_wan22_family_through_the_cli(family_models, tmp_path, capsys, family, image, args):
    model = family_models[family]
    video = tmp_path / "clip.mp4"
    extra = ["--image", str(write_png(tmp_path / "first.png"))] if image else []
    status, out, err = run_cli(capsys, "render", "--model", str(model), "--prompt", "a fox", "--seed", "5",
                               "--device", "cpu", "--out", str(video), *extra, *args)
    assert status == 0, err
    frames, width, height, fps, sha = rendered(out, video, family)
    assert (frames, width, height, fps) == (9, 64, 64, FAMILY_FPS[family])
    assert read_mp4(video).shape == (9, 64, 64, 3)
    assert probe_mp4(video)["fps"] == FAMILY_FPS[family]
    assert [m.groups() for m in PROGRESS.finditer(err)] == [(str(i), "4") for i in range(1, 5)]

    # The same job through the Python API: the CLI passed the family's parameters and the image.
    engine = Engine(ModelSet.from_dir(model))
    assert engine.spec.name == family
    changes = {"guidance": 2.5, "guidance_2": 1.5, "boundary": 0.95} if args else {}
    params = engine.spec.params(**changes)
    inputs = {"image": str(tmp_path / "first.png")} if image else {}
    assert engine.render("a fox", 5, params, inputs=inputs).frames_sha256 == sha
    if args:  # the expert flags change the frames
        assert engine.render("a fox", 5).frames_sha256 != sha
    if image:  # the image is part of the job: another image, other frames
        flipped = {"image": str(write_png(tmp_path / "flipped.png", flip=True))}
        assert engine.render("a fox", 5, params, inputs=flipped).frames_sha256 != sha


@pytest.mark.parametrize("family, image, reason", [
    ("wan2.2-t2v-a14b", "png", "--image: the Wan2.2 T2V-A14B family takes no image (its inputs: loras_high, loras_low)"),
    ("wan2.1-t2v", "png", "--image: the Wan2.1 T2V family takes no image (its inputs: loras)"),
    ("wan2.2-i2v-a14b", None, "the Wan2.2 I2V-A14B family needs --image"),
    ("wan2.2-i2v-a14b", "text", "not a PNG, JPEG or WebP image"),
    ("wan2.2-i2v-a14b", "missing", "nowhere.png"),
], ids=["t2v-a14b-given-image", "wan21-given-image", "i2v-without-image", "i2v-not-an-image", "i2v-missing-image"])
def test_render_refuses_an_image_the_family_cannot_take_in_one_line_before_loading(
        family_models, tmp_path, capsys, monkeypatch, family, image, reason):
    import engine.render

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(engine.render.Engine, "__init__", no_load)
    paths = {"png": write_png(tmp_path / "first.png"), "missing": tmp_path / "nowhere.png", None: None}
    paths["text"] = tmp_path / "notes.png"
    paths["text"].write_text("not an image\n")
    extra = ["--image", str(paths[image])] if image else []
    video = tmp_path / "x.mp4"
    status, out, err = run_cli(capsys, "render", "--model", str(family_models[family]), "--prompt", "a fox",
                               "--device", "cpu", "--out", str(video), *extra)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("reelray: error: ") and reason in err, err
    assert not video.exists()


def copy_experts(source: Path, target: Path, high: str | None, low: str | None) -> Path:
    """`target` with the text encoder, the VAE and the experts of `source` under the names given (None: left out)."""
    names = file_names("Q8_0", "wan2.2-t2v-a14b")
    target.mkdir()
    for role in ("text_encoder", "vae"):
        shutil.copy(source / names[role], target / names[role])
    for role, name in (("dit_high", high), ("dit_low", low)):
        if name is not None:
            shutil.copy(source / names[role], target / name)
    return target


def test_a_lone_expert_is_refused_naming_the_missing_low_noise_expert(family_models, tmp_path, capsys):
    source = family_models["wan2.2-t2v-a14b"]
    high_name = Path(file_names("Q8_0", "wan2.2-t2v-a14b")["dit_high"]).name
    lone = copy_experts(source, tmp_path / "lone", high=high_name, low=None)
    for args in (["--model", str(lone)],
                 ["--dit-high", str(lone / high_name), "--text-encoder", str(lone / "umt5-tiny-encoder-Q8_0.gguf"),
                  "--vae", str(lone / "wan_2.1_vae_tiny.safetensors")]):
        status, out, err = run_cli(capsys, "render", *args, "--prompt", "a fox", "--device", "cpu",
                                   "--out", str(tmp_path / "x.mp4"))
        assert status == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"reelray: error: {lone / high_name}: "), err
        assert "the low-noise expert, is missing" in err and "LowNoise" in err
    assert not (tmp_path / "x.mp4").exists()


def test_two_unnamed_identical_dits_are_refused_with_the_dit_high_dit_low_hint(family_models, tmp_path, capsys):
    unnamed = copy_experts(family_models["wan2.2-t2v-a14b"], tmp_path / "unnamed",
                           high="expert-a-Q8_0.gguf", low="expert-b-Q8_0.gguf")
    status, out, err = run_cli(capsys, "render", "--model", str(unnamed), "--prompt", "a fox", "--device", "cpu",
                               "--out", str(tmp_path / "x.mp4"))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"reelray: error: {unnamed}: "), err
    assert "two DiTs of one shape" in err and "--dit-high and --dit-low" in err
    assert "expert-a-Q8_0.gguf" in err and "expert-b-Q8_0.gguf" in err


def test_an_explicit_dit_high_dit_low_pair_renders_as_the_named_experts_do(family_models, tmp_path, capsys):
    named = family_models["wan2.2-t2v-a14b"]
    unnamed = copy_experts(named, tmp_path / "unnamed", high="expert-a-Q8_0.gguf", low="expert-b-Q8_0.gguf")
    common = ["--text-encoder", str(unnamed / "umt5-tiny-encoder-Q8_0.gguf"),
              "--vae", str(unnamed / "wan_2.1_vae_tiny.safetensors"),
              "--prompt", "a fox", "--seed", "5", "--device", "cpu"]
    shas = {}
    for case, args in {
        "named dir": ["--model", str(named), "--prompt", "a fox", "--seed", "5", "--device", "cpu"],
        "pair": ["--dit-high", str(unnamed / "expert-a-Q8_0.gguf"), "--dit-low", str(unnamed / "expert-b-Q8_0.gguf"),
                 *common],
        "swapped": ["--dit-high", str(unnamed / "expert-b-Q8_0.gguf"), "--dit-low", str(unnamed / "expert-a-Q8_0.gguf"),
                    *common],
    }.items():
        video = tmp_path / f"{case}.mp4"
        status, out, err = run_cli(capsys, "render", *args, "--out", str(video))
        assert status == 0, (case, err)
        shas[case] = rendered(out, video, "wan2.2-t2v-a14b")[-1]
    # The same bytes in the same roles are the same model; the roles swapped are another.
    assert shas["pair"] == shas["named dir"] != shas["swapped"]


# --- the inputs of `render`, checked against a family's InputSpecs (no model needed) -------------


def _mixed_spec(required: tuple[str, ...] = ()):
    """A made-up family with every input kind; `mask_video` needs `control_video`."""
    from jobs.family import FamilySpec, InputSpec
    from jobs.params import ParamSpec

    specs = REELRAY_FAMILIES["wan2.1-t2v"].spec.param_specs + (
        ParamSpec("context_scale", "float", 1.0, low=0.0),)
    return FamilySpec("test-mixed", "Test Mixed", specs, inputs=(
        InputSpec("image", "image", required="image" in required, help="a first frame"),
        InputSpec("control_video", "video", required="control_video" in required, help="a control video"),
        InputSpec("mask_video", "video", required=False, needs="control_video"),
        InputSpec("reference_images", "images", required="reference_images" in required, help="references"),
    ))


def _render_args(*extra: str):
    from pipeline.cli import build_parser

    return build_parser().parse_args(["render", "--model", "m", "--prompt", "p", "--out", "x.mp4", *extra])


@pytest.fixture
def fake_probe_video(monkeypatch):
    """engine.video_input stood in for by a module whose probe_video records its calls and accepts *.mp4 files."""
    import types

    from jobs.inputs import InputError

    calls = []

    def probe_video(uri):
        calls.append(uri)
        if not str(uri).endswith(".mp4"):
            raise InputError(f"{uri}: not a video (fake probe)")
        return 64, 48, 9

    monkeypatch.setitem(sys.modules, "engine.video_input", types.SimpleNamespace(probe_video=probe_video))
    return calls


def test_render_input_flags_reach_the_family_as_its_inputs(tmp_path, fake_probe_video):
    from pipeline.cli import param_overrides, render_inputs

    a, b = write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png", flip=True)
    args = _render_args("--control-video", "ctl.mp4", "--mask-video", "mask.mp4",
                        "--reference-images", str(b), str(a), "--image", str(a), "--context-scale", "0.5")
    spec = _mixed_spec()
    assert render_inputs(args, spec) == {"image": str(a), "control_video": "ctl.mp4", "mask_video": "mask.mp4",
                                         "reference_images": [str(b), str(a)]}  # the order given
    assert fake_probe_video == ["ctl.mp4", "mask.mp4"]
    assert param_overrides(args) == {"context_scale": 0.5}
    assert spec.params(**param_overrides(args)).context_scale == 0.5
    assert render_inputs(_render_args("--reference-images", str(a)), spec) == {"reference_images": [str(a)]}
    assert render_inputs(_render_args(), spec) == {}


@pytest.mark.parametrize("argv, required, reason", [
    (["--control-video", "c.mp4"], None,
     "--control-video: the Wan2.1 T2V family takes no control_video (its inputs: loras)"),
    (["--reference-images", "{a}"], None,
     "--reference-images: the Wan2.1 T2V family takes no reference_images (its inputs: loras)"),
    (["--mask-video", "m.mp4"], (), "--mask-video needs --control-video"),
    ([], ("control_video",), "the Test Mixed family needs --control-video (a control video)"),
    (["--control-video", "c.mp4"], ("reference_images",), "the Test Mixed family needs --reference-images (references)"),
    (["--reference-images", "{a}", "{tmp}/notes.png"], (), "notes.png: not a PNG, JPEG or WebP image"),
    (["--reference-images", "{a}", "{tmp}/gone.png"], (), "gone.png"),
    (["--reference-images", ""], (), "input reference_images: element 0: must be a file path or URI"),
    (["--control-video", "{a}"], (), "a.png: not a video (fake probe)"),
], ids=["video-for-t2v", "references-for-t2v", "mask-without-control", "required-video", "required-references",
        "reference-not-an-image", "reference-missing", "reference-blank", "control-not-a-video"])
def test_render_refuses_inputs_the_family_cannot_take_in_one_line(tmp_path, fake_probe_video, argv, required, reason):
    from pipeline.cli import CLIError, render_inputs

    a = write_png(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not an image\n")
    spec = REELRAY_FAMILIES["wan2.1-t2v"].spec if required is None else _mixed_spec(required)
    args = _render_args(*(arg.format(a=a, tmp=tmp_path) for arg in argv))
    with pytest.raises(ValueError) as exc:  # CLIError, or the file's own error (ImageError, InputError)
        render_inputs(args, spec)
    text = str(exc.value)
    assert reason.format(tmp=tmp_path) in text and "\n" not in text, text
    if "fake probe" not in reason and "PNG" not in reason and "gone" not in reason:
        assert isinstance(exc.value, CLIError)


def test_render_reference_images_flag_takes_one_or_more_paths(capsys):
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["render", "--model", "m", "--prompt", "p", "--out", "x.mp4", "--reference-images"])
    assert "expected at least one argument" in capsys.readouterr().err
