"""`reelray inspect`: a file's family, configuration and defaults, and what an incomplete file lacks."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.describe import describe_file, format_description
from engine.gguf import GGUFFile
from engine.gguf.writer import write_gguf
from engine.tiny import FAMILIES, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_model(root / family, family=family) for family in FAMILIES}


@pytest.mark.parametrize("family, role, label", [
    ("wan2.1-t2v", "dit", "Wan2.1 T2V"),
    ("wan2.2-t2v-a14b", "dit_high", "Wan2.2 T2V-A14B high-noise expert"),
    ("wan2.2-t2v-a14b", "dit_low", "Wan2.2 T2V-A14B low-noise expert"),
    ("wan2.2-i2v-a14b", "dit_high", "Wan2.2 I2V-A14B high-noise expert"),
    ("wan2.2-ti2v-5b", "dit", "Wan2.2 TI2V-5B"),
    ("wan2.1-i2v", "dit", "Wan2.1 I2V"),
    ("wan2.1-vace", "dit", "Wan2.1 VACE"),
    ("wan2.2-vace-fun-a14b", "dit_high", "Wan2.2 VACE-Fun A14B high-noise expert"),
    ("wan2.2-vace-fun-a14b", "dit_low", "Wan2.2 VACE-Fun A14B low-noise expert"),
    ("wan2.1-i2v", "image_encoder", "CLIP vision encoder (the image encoder of Wan2.1 I2V)"),
    ("wan2.1-t2v", "vae", "Wan2.1 VAE"),
    ("wan2.2-ti2v-5b", "vae", "Wan2.2 VAE"),
])
def test_each_file_names_its_family(tiny_sets, family, role, label):
    info = describe_file(tiny_sets[family][role])
    assert info["family"] == label
    if role.startswith("dit"):
        assert info["family_name"] == family
        # the defaults rendering will use: the family's, with the tiny file's own
        assert info["defaults"]["width"] == 64 and info["defaults"]["steps"] == 4
    assert f"family        {label}" in format_description(info)


def test_a14b_defaults_include_the_expert_parameters(tiny_sets):
    defaults = describe_file(tiny_sets["wan2.2-t2v-a14b"]["dit_high"])["defaults"]
    assert (defaults["guidance"], defaults["guidance_2"], defaults["boundary"], defaults["shift"]) == (4.0, 3.0, 0.875, 12.0)


def test_a_vace_dit_shows_where_its_hints_go(tiny_sets):
    info = describe_file(tiny_sets["wan2.1-vace"]["dit"])
    assert info["config"]["vace_layers"] == [0, 2]  # 4 main blocks, 2 VACE blocks
    assert "VACE hints after blocks [0, 2]" in format_description(info)
    assert info["defaults"]["context_scale"] == 1.0 and info["defaults"]["shift"] == 16.0


def test_a_renamed_expert_is_described_by_its_shapes(tiny_sets, tmp_path):
    # without high/low in its name, a 16-channel expert has the shapes of a Wan2.1 T2V DiT
    plain = tmp_path / "model.gguf"
    shutil.copy(tiny_sets["wan2.2-t2v-a14b"]["dit_high"], plain)
    assert describe_file(plain)["family"] == "Wan2.1 T2V"


def test_an_incomplete_dit_is_described_with_what_it_lacks_and_exits_0(tiny_sets, tmp_path):
    source = tiny_sets["wan2.1-t2v"]["dit"]
    broken = tmp_path / "broken.gguf"
    with GGUFFile(source) as f:
        tensors = {name: (f.dequantize(name).numpy(), f.qtype(name)) for name in f.tensor_names
                   if name != "head.head.weight"}
        metadata = {k: v for k, v in f.metadata.items() if not k.startswith(("general.", "GGUF."))}
    write_gguf(broken, "wan", tensors, metadata=metadata)
    info = describe_file(broken)
    assert info["kind"] == "wan_dit" and info["tensors"] == len(tensors)
    assert "head.head.weight" in info["problem"] and "config" not in info
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(broken)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "problem       tensor 'head.head.weight' is missing" in out.stdout
    assert "tensors       " in out.stdout


def test_an_unreadable_file_exits_2_in_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(bad)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(bad) in out.stderr
