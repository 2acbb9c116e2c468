"""The VACE families end to end: `reelray run` on Ray actors and `reelray render`, with control
videos, masks and reference images as real files, and the bad ones as row errors or failed jobs.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from engine.video import read_mp4, write_mp4
from pipeline.driver import run
from run_helpers import metadata, run_config, write_manifest, write_png

FRAMES, SIZE = 9, 64


def write_video(path: Path, frames: int = FRAMES, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> Path:
    """A moving gradient (its content shifts every frame), H.264."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    colour = rng.integers(1, 4, size=3)
    video = np.stack([np.stack([(x + 4 * i) * colour[0], (y + 2 * i) * colour[1], (x + y) * colour[2]], axis=-1)
                      for i in range(frames)]).astype(np.uint8)
    write_mp4(video, path, fps=16)
    return path


def write_mask(path: Path, frames: int = FRAMES, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    video = np.zeros((frames, *size, 3), np.uint8)
    video[:, :, size[1] // 2:] = 255  # generate the right half, keep the left
    write_mp4(video, path, fps=16)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vace_model(tmp_path_factory) -> Path:
    from engine.tiny import make_tiny_model

    model = tmp_path_factory.mktemp("vace") / "model"
    make_tiny_model(model, family="wan2.1-vace")
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vace-inputs")
    (d / "broken.mp4").write_text("not a video")
    return {
        "control": write_video(d / "control.mp4"), "other": write_video(d / "other.mp4", seed=1),
        "long": write_video(d / "long.mp4", frames=3 * FRAMES), "mask": write_mask(d / "mask.mp4"),
        "short_mask": write_mask(d / "short_mask.mp4", frames=5), "broken": d / "broken.mp4",
        "a": write_png(d / "a.png"), "b": write_png(d / "b.png", flip=True), "dir": d,
    }


def test_vace_manifest_renders_end_to_end_and_bad_inputs_are_their_rows_errors(ray_session, vace_model, files,
                                                                             tmp_path):
    from engine.model_set import ModelSet
    from engine.render import Engine

    f = {k: str(v) for k, v in files.items()}
    rows = [
        dict(prompt="text only"),
        dict(prompt="inpaint", control_video=f["control"], mask_video=f["mask"], reference_images=[f["a"], f["b"]],
             context_scale=0.5),
        dict(prompt="references swapped", control_video=f["control"], mask_video=f["mask"],
             reference_images=[f["b"], f["a"]], context_scale=0.5),
        dict(prompt="long control", control_video=f["long"]),
        dict(prompt="another control", control_video=f["other"]),
        dict(prompt="mask too short", control_video=f["control"], mask_video=f["short_mask"]),  # row error: headers
        dict(prompt="broken control", control_video=f["broken"]),  # row error: not a video
        dict(prompt="missing reference", reference_images=[f["a"], str(files["dir"] / "gone.png")]),  # row error
        dict(prompt="mask alone", mask_video=f["mask"]),  # row error: needs control_video
    ]
    columns = {name: [row.get(name) for row in rows]
               for name in ("prompt", "control_video", "mask_video", "reference_images", "context_scale")}
    manifest = write_manifest(tmp_path / "m.parquet", columns | {"seed": [0] * len(rows)})
    out = tmp_path / "out"
    report = run(run_config(vace_model, manifest, out, actors=1, retries=0, skip_invalid=True), stream=io.StringIO())
    assert report["family"] == "wan2.1-vace"
    assert report["counts"] == report["counts"] | {"jobs": 5, "done": 5, "failed": 0, "invalid_rows": 4}
    # A mask video shorter than its control video: found from the two headers when the manifest is read.
    (short,) = [e for e in report["invalid_rows"] if e.startswith("row 5: ")]
    assert short == (f"row 5: mask_video: {f['short_mask']}: 5 frames 64x64, but its control video {f['control']} "
                     f"has 9 frames 64x64"), short

    df = metadata(out).set_index("prompt")
    assert set(df.index) == {row["prompt"] for row in rows[:5]}
    done = df[df["status"] == "done"]
    assert done["frames_sha256"].nunique() == 5  # every input changed the frames
    assert list(df.loc["inpaint", "reference_images_sha256"]) == [sha(files["a"]), sha(files["b"])]
    assert list(df.loc["references swapped", "reference_images_sha256"]) == [sha(files["b"]), sha(files["a"])]
    assert df.loc["inpaint", "control_video_sha256"] == sha(files["control"])
    assert df.loc["inpaint", "mask_video_sha256"] == sha(files["mask"])
    assert df.loc["inpaint", "context_scale"] == 0.5 and df.loc["text only", "context_scale"] == 1.0

    # The frames are the engine's for the same job: every input reached the actor.
    models = ModelSet.from_dir(vace_model)
    engine = Engine(models)
    for prompt, row in done.iterrows():
        params = models.spec.params(context_scale=float(row["context_scale"]))
        inputs = {name: row[name] for name in ("control_video", "mask_video") if isinstance(row[name], str)}
        if row["reference_images"] is not None and len(row["reference_images"]):
            inputs["reference_images"] = list(row["reference_images"])
        assert engine.render(prompt, 0, params, inputs=inputs).frames_sha256 == row["frames_sha256"], prompt
        assert read_mp4(out / row["file_name"]).shape == (FRAMES, SIZE, SIZE, 3)


def test_vace_fun_a14b_renders_a_control_video_through_run(ray_session, files, tmp_path):
    from engine.tiny import make_tiny_model

    model = tmp_path / "model"
    make_tiny_model(model, family="wan2.2-vace-fun-a14b")
    manifest = write_manifest(tmp_path / "m.parquet", {
        "prompt": ["a fox", "a fox"], "seed": [0, 0], "control_video": [str(files["control"])] * 2,
        "boundary": [None, 0.5]})
    out = tmp_path / "out"
    report = run(run_config(model, manifest, out, actors=1), stream=io.StringIO())
    assert report["family"] == "wan2.2-vace-fun-a14b"
    assert report["counts"] == report["counts"] | {"jobs": 2, "done": 2, "failed": 0}
    df = metadata(out).sort_values("row")
    assert list(df["boundary"]) == [0.875, 0.5] and df["frames_sha256"].nunique() == 2


@pytest.mark.parametrize("family", ["wan2.1-vace", "wan2.2-vace-fun-a14b"])
def test_render_with_control_video_mask_and_references(vace_model, files, tmp_path, capsys, family):
    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.tiny import make_tiny_model
    from pipeline.cli import main

    if family != "wan2.1-vace":
        vace_model = tmp_path / "model"
        make_tiny_model(vace_model, family=family)
    out = tmp_path / "x.mp4"
    args = ["render", "--model", str(vace_model), "--prompt", "a fox", "--seed", "3", "--device", "cpu",
            "--control-video", str(files["control"]), "--mask-video", str(files["mask"]),
            "--reference-images", str(files["a"]), str(files["b"]), "--context-scale", "0.7", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    models = ModelSet.from_dir(vace_model)
    assert models.family == family and f": {family}," in printed
    inputs = {"control_video": str(files["control"]), "mask_video": str(files["mask"]),
              "reference_images": [str(files["a"]), str(files["b"])]}
    expected = Engine(models).render("a fox", 3, models.spec.params(context_scale=0.7), inputs=inputs)
    assert f"frames_sha256 {expected.frames_sha256}" in printed
    assert read_mp4(out).shape == (FRAMES, SIZE, SIZE, 3)


@pytest.mark.parametrize("extra, reason", [
    (["--mask-video", "{mask}"], "--mask-video needs --control-video"),
    (["--control-video", "{broken}"], "broken.mp4"),
    (["--reference-images", "{dir}/gone.png"], "gone.png: no such file"),
    (["--image", "{a}"], "takes no image"),
])
def test_render_refuses_bad_inputs_in_one_line(vace_model, files, tmp_path, capsys, extra, reason):
    from pipeline.cli import main

    extra = [arg.format(**{k: str(v) for k, v in files.items()}) for arg in extra]
    status = main(["render", "--model", str(vace_model), "--prompt", "a fox", "--out", str(tmp_path / "x.mp4"),
                   "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert status == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.mp4").exists()
