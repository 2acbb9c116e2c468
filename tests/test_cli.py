"""The `reelray` command: inspect, make-tiny-model, render.

Run in this process through `pipeline.cli.main([...])` (captured stdout and
stderr), and in a subprocess where the process boundary is the point: the
exit status and that a user error prints one line, never a traceback.
Expected figures come from gguf-py's own reader (the oracle for what a file
holds) and from the tiny model's definition in engine/tiny.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from engine.model_set import ModelSet
from engine.render import Engine
from engine.tiny import TINY_DIT, TINY_T5, file_names
from engine.video import probe_mp4, read_mp4
from pipeline.cli import main

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


def test_inspect_describes_the_tiny_dit(tiny_model, capsys):
    path = dit_file(tiny_model)
    types, n_params = gguf_py_view(path)
    # 2 blocks x (4 self-attention + 4 cross-attention + 2 FFN matrices) are Q8_0, the rest F32.
    assert types == Counter({"Q8_0": 20, "F32": sum(types.values()) - 20})

    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == str(path)
    fields = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1].strip() for line in lines[1:4]}
    assert fields == {
        "kind": "wan_dit",
        "architecture": "wan",
        "tensors": f"{sum(types.values())}  (F32: {types['F32']}, Q8_0: 20)",
    }
    assert f"  parameters    {n_params:,}" in lines
    assert f"(file {path.stat().st_size:,})" in out
    assert lines[-1] == (
        f"  wan config    custom: dim {TINY_DIT['dim']}, layers {TINY_DIT['num_layers']}, "
        f"heads {TINY_DIT['num_heads']}, ffn {TINY_DIT['ffn_dim']}, in/out channels 16/16, text dim {TINY_T5['dim']}"
    )


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
    """One file per way a user can point `inspect` at something that is not a whole GGUF."""
    good = dit_file(tiny_model).read_bytes()
    files = {
        "missing": tmp_path / "nope.gguf",
        "truncated_header": tmp_path / "header.gguf",
        "truncated_data": tmp_path / "data.gguf",
        "not_gguf": tmp_path / "notes.gguf",
        "empty": tmp_path / "empty.gguf",
        "safetensors": tiny_model / file_names("Q8_0")["vae"],
    }
    files["truncated_header"].write_bytes(good[:1000])
    files["truncated_data"].write_bytes(good[:-1000])
    files["not_gguf"].write_text("just some text, no magic\n")
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such file"),
    ("truncated_header", "bytes follow"),
    ("truncated_data", "data lies outside the file"),
    ("not_gguf", "not a GGUF file"),
    ("empty", "no GGUF header"),
    ("safetensors", "not a GGUF file"),
])
def test_inspect_refuses_a_bad_file_in_one_line(tiny_model, tmp_path, capsys, case, reason):
    path = bad_files(tiny_model, tmp_path)[case]
    status, out, err = run_cli(capsys, "inspect", str(path))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"reelray: error: {path}") and reason in err


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
    status, out, _ = run_cli(capsys, "make-tiny-model", str(model))
    assert status == 0
    listed = dict(line.split() for line in out.splitlines())
    assert listed == {role: str(model / name) for role, name in file_names("Q8_0").items()}
    assert ModelSet.from_dir(model).dit == model / file_names("Q8_0")["dit"]

    video = tmp_path / "renders" / "fox.mp4"  # the parent directory is created
    status, out, err = run_cli(capsys, "render", "--model", str(model), "--prompt", "a fox",
                               "--seed", "5", "--device", "cpu", "--out", str(video))
    assert status == 0, err
    frames = read_mp4(video)
    assert frames.shape == (9, 64, 64, 3)
    assert probe_mp4(video) == {"frames": 9, "width": 64, "height": 64, "fps": 16.0, "codec": "h264"}
    assert re.fullmatch(rf"{re.escape(str(video))}: 9 frames 64x64 at 16 fps, frames_sha256 [0-9a-f]{{64}}\n", out)
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
    params = engine.defaults.override(steps=2, width=96, height=32, frames=5, sampler="euler", fps=8,
                                      guidance=3.5, shift=8.0)
    expected = engine.render("a fox", 5, params).frames_sha256
    assert SHA256.search(out.strip()).group(1) == expected
    assert expected != engine.render("a fox", 5, params.override(sampler="unipc")).frames_sha256


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
    ([], "give --model DIR, or all of --dit, --text-encoder and --vae"),
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
