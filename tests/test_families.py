"""Model sets and families: recognition from file headers, the refusals, and what the driver reads.

Every family's tiny model set is written in its real layout (`make_tiny_model`),
then recognised from a directory (subfolders included) or from named files.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.families import FAMILIES, foreign_names, get_family
from engine.model_set import ModelSet, ModelSetError
from engine.tiny import make_tiny_model
from jobs.params import RenderParams
from pipeline.driver import read_jobs


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {family: make_tiny_model(root / family, family=family) for family in FAMILIES}


def copy_set(paths: dict, roles, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for role in roles:
        shutil.copy(paths[role], directory / paths[role].name)
    return directory


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_tiny_set_is_recognised_as_its_family(sets, family):
    directory = sets[family]["text_encoder"].parent
    models = ModelSet.from_dir(directory)
    assert models.family == family
    assert {role: path.name for role, path in models.files.items()} == \
        {role: path.name for role, path in sets[family].items()}
    assert models.spec.name == family and models.spec.defaults().width == 64  # the file's own defaults
    models.check_fit()
    # the same files named one by one give the same set and digest
    named = ModelSet.from_files({role: str(path) for role, path in sets[family].items()})
    assert named.family == family and named.digest() == models.digest()


def test_the_experts_are_told_apart_by_name_and_the_roles_enter_the_digest(sets, tmp_path):
    paths = sets["wan2.2-t2v-a14b"]
    models = ModelSet.from_dir(paths["text_encoder"].parent)
    assert "HighNoise" in models.files["dit_high"].name and "LowNoise" in models.files["dit_low"].name
    swapped = ModelSet.from_files({"dit_high": paths["dit_low"], "dit_low": paths["dit_high"],
                                   "text_encoder": paths["text_encoder"], "vae": paths["vae"]})
    assert swapped.family == "wan2.2-t2v-a14b" and swapped.digest() != models.digest()


@pytest.mark.parametrize("name", ["x-high_noise.gguf", "HIGH-NOISE.gguf", "model_highnoise_q4.gguf", "High Noise.gguf"])
def test_expert_names_in_any_case_and_separator(sets, tmp_path, name):
    paths = sets["wan2.2-t2v-a14b"]
    directory = copy_set(paths, ("text_encoder", "vae", "dit_low"), tmp_path / "d")
    shutil.copy(paths["dit_high"], directory / name)
    models = ModelSet.from_dir(directory)
    assert models.files["dit_high"].name == name


@pytest.mark.parametrize("expert, missing", [("dit_high", "low-noise"), ("dit_low", "high-noise")])
def test_a_lone_expert_is_refused_naming_its_missing_partner(sets, tmp_path, expert, missing):
    paths = sets["wan2.2-t2v-a14b"]
    directory = copy_set(paths, ("text_encoder", "vae", expert), tmp_path / "lone")
    with pytest.raises(ModelSetError) as exc:
        ModelSet.from_dir(directory)
    message = str(exc.value)
    assert f"the {missing} expert, is missing" in message and paths[expert].name in message
    assert "\n" not in message
    with pytest.raises(ModelSetError, match=f"the {missing} expert, is missing"):
        ModelSet.from_files({expert: paths[expert], "text_encoder": paths["text_encoder"], "vae": paths["vae"]})


def test_two_unnamed_dits_of_one_shape_ask_for_names(sets, tmp_path):
    paths = sets["wan2.2-t2v-a14b"]
    directory = copy_set(paths, ("text_encoder", "vae"), tmp_path / "d")
    shutil.copy(paths["dit_high"], directory / "a.gguf")
    shutil.copy(paths["dit_low"], directory / "b.gguf")
    with pytest.raises(ModelSetError, match="name the Wan2.2 A14B pair with --dit-high and --dit-low"):
        ModelSet.from_dir(directory)


def test_a_pair_of_different_shapes_is_refused(sets, tmp_path):
    t2v, i2v = sets["wan2.2-t2v-a14b"], sets["wan2.2-i2v-a14b"]
    with pytest.raises(ModelSetError, match="the two experts differ in shape"):
        ModelSet.from_files({"dit_high": t2v["dit_high"], "dit_low": i2v["dit_low"],
                             "text_encoder": t2v["text_encoder"], "vae": t2v["vae"]})


def test_a_dit_with_the_wrong_vae_is_refused(sets):
    ti2v, t2v = sets["wan2.2-ti2v-5b"], sets["wan2.1-t2v"]
    with pytest.raises(ModelSetError, match="needs a VAE with 48-channel latents; none found"):
        ModelSet.from_files({"dit": ti2v["dit"], "text_encoder": ti2v["text_encoder"], "vae": t2v["vae"]})


def test_family_restricts_recognition(sets):
    paths = sets["wan2.1-t2v"]
    files = {role: paths[role] for role in ("dit", "text_encoder", "vae")}
    assert ModelSet.from_files(files, family="wan2.1-t2v").family == "wan2.1-t2v"
    with pytest.raises(ModelSetError, match="checked the wan2.2-ti2v-5b family"):
        ModelSet.from_files(files, family="wan2.2-ti2v-5b")
    with pytest.raises(ModelSetError, match="unknown family 'wan9'"):
        ModelSet.from_files(files, family="wan9")


def test_foreign_names_are_the_other_families_parameters_and_inputs():
    vace = {"context_scale", "control_video", "mask_video", "reference_images"}
    experts = {"loras_high", "loras_low"}  # a LoRA set per expert; one DiT: "loras"
    assert foreign_names(get_family("wan2.1-t2v")) == {"guidance_2", "boundary", "image", "area"} | vace | experts
    assert foreign_names(get_family("wan2.1-i2v")) == {"guidance_2", "boundary"} | vace | experts
    assert foreign_names(get_family("wan2.2-t2v-a14b")) == {"image", "area", "loras"} | vace
    assert foreign_names(get_family("wan2.2-ti2v-5b")) == {"guidance_2", "boundary", "area"} | vace | experts
    assert foreign_names(get_family("wan2.2-i2v-a14b")) == {"area", "loras"} | vace
    assert foreign_names(get_family("wan2.1-vace")) == {"guidance_2", "boundary", "image", "area"} | experts
    assert foreign_names(get_family("wan2.2-vace-fun-a14b")) == {"image", "area", "loras"}


def test_vace_files_are_not_taken_for_their_t2v_shapes(sets, tmp_path):
    """A VACE DiT is a T2V DiT plus VACE blocks: recognised as VACE, a VACE-Fun pair likewise, and a
    VACE expert and a T2V-A14B expert do not make a pair."""
    vace, fun, a14b = sets["wan2.1-vace"], sets["wan2.2-vace-fun-a14b"], sets["wan2.2-t2v-a14b"]
    assert ModelSet.from_files({r: vace[r] for r in ("dit", "text_encoder", "vae")}).family == "wan2.1-vace"
    with pytest.raises(ModelSetError, match="checked the wan2.1-t2v family"):
        ModelSet.from_files({r: vace[r] for r in ("dit", "text_encoder", "vae")}, family="wan2.1-t2v")
    with pytest.raises(ModelSetError, match="the two experts differ in shape"):
        ModelSet.from_files({"dit_high": fun["dit_high"], "dit_low": a14b["dit_low"],
                             "text_encoder": fun["text_encoder"], "vae": fun["vae"]})


def test_the_driver_reads_image_jobs_and_checks_each_image_once(sets, tmp_path):
    paths = sets["wan2.2-i2v-a14b"]
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    pq.write_table(pa.table({
        "prompt": ["a", "b", "c", "d"],
        "image": ["good.png", "text.png", "gone.png", "good.png"],
        "boundary": pa.array([None, None, None, 0.95]),
    }), tmp_path / "m.parquet")
    files = {role: str(path) for role, path in paths.items()}
    jobs, errors, n_rows, models, digest = read_jobs(str(tmp_path / "m.parquet"), files, None, [0])
    assert n_rows == 4 and models.family == "wan2.2-i2v-a14b"
    assert [(j.row, j.params.boundary) for j in jobs] == [(0, 0.9), (3, 0.95)]
    sha = hashlib.sha256((tmp_path / "good.png").read_bytes()).hexdigest()
    assert {j.inputs["image"].sha256 for j in jobs} == {sha}
    assert [(e.row, e.field) for e in errors] == [(1, "image"), (2, "image")]
    assert "text.png: not a PNG, JPEG or WebP image" in errors[0].reason
    assert "gone.png" in errors[1].reason


def test_a_text_family_refuses_an_image_column_per_row(sets, tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "image": [None, "x.png"]}), tmp_path / "m.parquet")
    files = {role: str(path) for role, path in sets["wan2.1-t2v"].items()}
    jobs, errors, *_ = read_jobs(str(tmp_path / "m.parquet"), files, None, None)
    assert [j.row for j in jobs] == [0]
    assert [str(e).split(" (")[0] for e in errors] == ["row 1: image: the Wan2.1 T2V family has no 'image'"]


def test_image_families_size_the_video_from_the_image_unless_the_job_gives_one():
    from engine.families import wan22_i2v_a14b, wan22_ti2v_5b
    from engine.families.base import RenderError

    i2v = get_family("wan2.2-i2v-a14b").spec
    # official rule: the image's aspect at 1280x720's area, sides multiples of 16
    assert wan22_i2v_a14b.output_size(i2v.defaults(), 600, 1000) == (736, 1232)
    assert wan22_i2v_a14b.output_size(i2v.params(width=640, height=352), 600, 1000) == (352, 640)
    with pytest.raises(ValueError, match=r"width 640, height 0: give both, or neither \(0: the Wan2.2 I2V-A14B"):
        i2v.params(width=640)  # the family's params refuse it (a manifest row error, before any render)
    with pytest.raises(RenderError, match="give both, or neither"):  # and the render still would
        wan22_i2v_a14b.output_size(RenderParams({**i2v.defaults(), "width": 640}), 600, 1000)
    for name in ("wan2.1-i2v", "wan2.2-ti2v-5b"):
        with pytest.raises(ValueError, match="give both, or neither"):
            get_family(name).spec.params(height=320)
    assert get_family("wan2.1-t2v").spec.params(width=320).height == 480  # a text family has a default height
    ti2v = get_family("wan2.2-ti2v-5b").spec
    assert wan22_ti2v_5b.output_size(ti2v.defaults(), None) == (704, 1280)  # text to video
    assert wan22_ti2v_5b.output_size(ti2v.defaults(), (600, 1000)) == (736, 1216)  # best_output_size at 1280x704
    assert wan22_ti2v_5b.output_size(ti2v.params(width=320, height=192), (600, 1000)) == (192, 320)


def test_wan21_i2v_needs_its_image_encoder_and_sizes_by_its_file(sets, tmp_path):
    paths = sets["wan2.1-i2v"]
    models = ModelSet.from_dir(paths["dit"].parent)
    assert models.files["image_encoder"].name == "clip_vision_h_tiny.safetensors"
    assert models.spec.negative_prompt.startswith("镜头晃动，")  # official wan_i2v_14B.sample_neg_prompt
    directory = copy_set(paths, ("dit", "text_encoder", "vae"), tmp_path / "no-clip")
    with pytest.raises(ModelSetError, match="needs its CLIP image encoder"):
        ModelSet.from_dir(directory)
    # the 720P file sizes videos from 1280x720's area, the 480P one from 832x480's (the tiny file's
    # own defaults leave `area` to the family)
    shutil.copy(paths["image_encoder"], directory)
    shutil.copy(paths["dit"], directory / "wan2.1-i2v-14b-720p-Q8_0.gguf")
    (directory / paths["dit"].name).unlink()
    assert ModelSet.from_dir(directory).spec.defaults().area == 1280 * 720
    assert (models.spec.defaults().area, models.spec.defaults().shift) == (832 * 480, 3.0)
    # official generate.py: shift 3.0 for i2v at 832*480, 5.0 otherwise (the tiny file's metadata
    # carries its own shift, so the rule is checked on the family's declaration)
    from engine.families import wan21_i2v

    assert wan21_i2v.SPEC.defaults().shift == 3.0
    assert wan21_i2v.file_defaults(Path("wan2.1-i2v-14b-720P-Q8_0.gguf")) == {"area": 1280 * 720, "shift": 5.0}
    assert wan21_i2v.file_defaults(Path("wan2.1-i2v-14b-480p-Q8_0.gguf")) == {}
    # a Wan2.2 I2V-A14B expert pair is not taken for Wan2.1 I2V (no image branch), nor the reverse
    assert ModelSet.from_dir(sets["wan2.2-i2v-a14b"]["text_encoder"].parent).family == "wan2.2-i2v-a14b"
