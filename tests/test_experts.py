"""The Wan2.2 A14B expert pair: which expert runs at which step, placement, and the swap.

The loop's use of the experts is held to diffusers in test_family_oracles.py;
here: the placement decision and its report, and that the swap placement
renders the very frames of the resident one, moving experts once per job.
"""
from __future__ import annotations

import pytest
import torch

from engine.families.experts import ExpertPair, expert_bytes
from engine.model_set import ModelSet
from engine.render import Engine
from engine.tiny import make_tiny_model


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    directory = tmp_path_factory.mktemp("a14b")
    make_tiny_model(directory, family="wan2.2-t2v-a14b")
    return ModelSet.from_dir(directory)


def test_expert_bytes_follow_the_weight_policy(a14b):
    from engine.gguf import GGUFFile

    with GGUFFile(a14b.files["dit_high"]) as f:
        params, raw = f.n_params, f.n_bytes
    assert expert_bytes(a14b.files["dit_high"], torch.float32, "dequantize_once") == 4 * params
    assert expert_bytes(a14b.files["dit_high"], torch.bfloat16, "dequantize_once") == 2 * params
    assert expert_bytes(a14b.files["dit_high"], torch.float32, "on_the_fly") == raw < 4 * params


def test_on_the_cpu_both_experts_are_resident_and_the_report_says_why(a14b):
    pair = ExpertPair(a14b.files["dit_high"], a14b.files["dit_low"], torch.device("cpu"), torch.float32,
                      "dequantize_once")
    assert pair.placement["mode"] == "resident" and "cpu device" in pair.placement["reason"]
    assert pair.use("high") is pair.high and pair.use("low") is pair.low
    assert pair.placement["swaps"] == 0
    with pytest.raises(ValueError, match="'resident' or 'swap'"):
        ExpertPair(a14b.files["dit_high"], a14b.files["dit_low"], torch.device("cpu"), torch.float32,
                   "dequantize_once", mode="sometimes")


def test_the_swap_placement_renders_the_resident_frames(a14b):
    resident = Engine(a14b)
    swap = Engine(a14b, placement="swap")
    assert swap.placement["mode"] == "swap" and resident.placement["mode"] == "resident"
    for seed in (0, 1):
        assert swap.render("a red fox", seed).frames_sha256 == resident.render("a red fox", seed).frames_sha256


def test_the_pair_compares_devices_with_their_index(monkeypatch):
    # A tensor on "cuda" reports "cuda:<current>", and torch.device("cuda") != torch.device("cuda", 0):
    # the pair keeps the indexed name, or it would see its expert elsewhere at every step and swap.
    from engine.families.experts import resolved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolved(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolved(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolved(torch.device("cpu")) == torch.device("cpu")
    assert torch.device("cuda") != torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the swap moves an expert off the GPU")
def test_the_swap_moves_each_expert_once_per_job_on_cuda(a14b):
    engine = Engine(a14b, device="cuda", dtype=torch.float32, placement="swap")
    resident = Engine(a14b, device="cuda", dtype=torch.float32)
    pair = engine.pipeline.experts
    assert next(pair.high.parameters()).device.type == "cuda"
    assert next(pair.low.parameters()).device.type == "cpu"
    for seed in range(2):
        before = engine.placement["swaps"]
        assert engine.render("a red fox", seed).frames_sha256 == resident.render("a red fox", seed).frames_sha256
        # the tiny defaults run 3 high-noise steps then 1 low-noise: onto low once, back to high at the next job
        assert engine.placement["swaps"] - before == (1 if seed == 0 else 2)
    assert next(pair.low.parameters()).device.type == "cuda"
    assert next(pair.high.parameters()).device.type == "cpu"
