"""`reelray quantize` and its quantizers (`engine/gguf/quantize.py`): the block types, the streaming
GGUF writer, and a tiny Wan DiT checkpoint quantized end to end, with LoRAs merged first.

Oracles: gguf-py's quantizers (the bytes of F16 ... Q5_1), gguf-py's dequantizer and the
engine's (`engine/gguf/dequant.py`; they agree bit for bit) for every block we write, blocks
built from known scales and quants, diffusers' own converter for the diffusers names of a
checkpoint, and the float32 model with the LoRA as a side path (`engine.lora.applied`).

Errors are relative RMS errors, sqrt(mean (y - x)^2 / mean x^2), on seeded Gaussian rows of
1536 values (the width of Wan 1.3B). The bounds are the measured errors + 1%: leaving out
a type's scale search (ggml's stretched grids, Q3_K's coordinate descent, IQ4's 7 tries)
raises its error by 1.5-10%, so each bound rejects it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import save_file

import engine.gguf.quantize as quantizers
from engine.gguf.dequant import dequantize as engine_dequantize
from engine.gguf.quantize import QuantizeError, quantize
from engine.gguf.writer import write_gguf, write_gguf_stream
from engine.lora import applied, read_lora
from engine.tiny import random_state_dict
from engine.wan.convert.dit import community_qtype
from engine.wan.dit import WanConfig, WanModel, load_dit
from pipeline.cli import main
from tests.run_helpers import one_torch_thread

Q = GGMLQuantizationType
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
# Measured relative RMS error on GAUSSIAN (below), and the bound (+1%).
MEASURED = {"Q2_K": 0.2956, "Q3_K": 0.1504, "Q4_K": 0.0711, "Q5_K": 0.0360, "Q6_K": 0.0177,
            "IQ4_NL": 0.0760, "IQ4_XS": 0.0766}
BOUND = {t: 1.01 * e for t, e in MEASURED.items()}
GAUSSIAN = np.random.default_rng(20250225).standard_normal((64, 1536)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: one thread."""
    with one_torch_thread():
        yield


def round_trip(x: np.ndarray, qtype: str) -> np.ndarray:
    """quantize, then dequantize with gguf-py; the engine's dequantizer must give the same bits."""
    blocks = quantize(x, qtype)
    ours = gguf_dequantize(blocks, Q[qtype])
    engine = engine_dequantize(torch.from_numpy(blocks.copy()), Q[qtype], x.shape).numpy()
    assert ours.shape == x.shape and np.array_equal(ours.view(np.uint32), engine.view(np.uint32))
    return ours


def rel_rms(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))


# --- the quantizers ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_the_types_gguf_py_quantizes_are_its_bytes(qtype):
    x = GAUSSIAN[:8]
    blocks = quantize(torch.from_numpy(x), qtype)
    theirs = np.ascontiguousarray(gguf_quantize(x, Q[qtype])).view(np.uint8).reshape(blocks.shape)
    assert blocks.dtype == np.uint8 and np.array_equal(blocks, theirs)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_gaussian_rows_round_trip_within_the_measured_error(qtype):
    err = rel_rms(round_trip(GAUSSIAN, qtype), GAUSSIAN)
    assert 0.9 * MEASURED[qtype] < err < BOUND[qtype], err


def test_without_its_search_each_type_misses_its_bound(monkeypatch):
    # The deliberate mistakes the bounds are set to catch: the first grid only.
    search, iq4 = quantizers._make_qkx2, quantizers._iq4_scale
    monkeypatch.setattr(quantizers, "_make_qkx2", lambda x, w, nmax, rmin, rdelta, nstep, use_mad:
                        search(x, w, nmax, rmin, rdelta, -1, use_mad))
    monkeypatch.setattr(quantizers, "_make_q3", _q3_no_descent)
    monkeypatch.setattr(quantizers, "_iq4_scale", lambda x, ntry=7: iq4(x, 0))
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "IQ4_NL", "IQ4_XS"):
        assert rel_rms(round_trip(GAUSSIAN, qtype), GAUSSIAN) > BOUND[qtype], qtype


def _q3_no_descent(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants without its coordinate descent: the grid through the largest |x|."""
    _, signed = quantizers._signed_max(x, dim=0)
    return signed / -nmax, (x * (-nmax / signed)).round_().clamp_(-nmax, nmax - 1) + nmax


def test_fewer_bits_more_error_and_iq4_nl_beats_q4_0_at_the_same_size():
    errors = {t: rel_rms(round_trip(GAUSSIAN, t), GAUSSIAN) for t in (*K_TYPES, "Q4_0")}
    assert errors["Q2_K"] > errors["Q3_K"] > errors["Q4_K"] > errors["Q5_K"] > errors["Q6_K"]
    assert errors["IQ4_NL"] < errors["Q4_0"]  # both 4.5 bits per value


@pytest.mark.parametrize("qtype, qmax", [("Q4_K", 15), ("Q5_K", 31)])
def test_a_block_made_of_known_scales_mins_and_quants_round_trips_exactly(qtype, qmax):
    # value = d * sc * q - dmin * m, per group of 32; d, dmin powers of two, so every value is exact in
    # float32. Each group holds q = 0 and q = qmax; the 6-bit scale and min reach 63 somewhere.
    rng = np.random.default_rng(3)
    d, dmin = 2.0 ** -7, 2.0 ** -6
    sc = rng.integers(1, 64, size=(8, 8))
    m = rng.integers(0, 64, size=(8, 8))
    sc[:, 3], m[:, 5] = 63, 63
    q = rng.integers(0, qmax + 1, size=(8, 8, 32))
    q[..., 0], q[..., 1] = 0, qmax
    x = ((d * sc)[..., None] * q - (dmin * m)[..., None]).astype(np.float32).reshape(8, 256)
    assert np.array_equal(round_trip(x, qtype), x)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_zeros_and_constant_blocks(qtype):
    assert np.array_equal(round_trip(np.zeros((2, 256), np.float32), qtype), np.zeros((2, 256), np.float32))
    const = np.array([[-0.37] * 256, [2.5] * 256], np.float32)
    # A constant comes back through one float16 scale: within float16's relative step.
    assert np.abs(round_trip(const, qtype) / const - 1).max() < 2 ** -11


@pytest.mark.parametrize("qtype", K_TYPES)
def test_magnitudes_scale_exactly_while_the_scales_are_normal_float16(qtype):
    x = GAUSSIAN[:16, :512]
    base = round_trip(x, qtype)
    for k in (-2, 12):  # |x| up to ~4.5 x 4096, inside float16; the smallest block scale stays normal
        assert np.array_equal(round_trip(x * 2.0 ** k, qtype), base * 2.0 ** k), k
    # Weight-sized values (1e-3) lose at most a quarter more to float16-subnormal scales;
    # values below ggml's group epsilon are zeros.
    tiny = x * np.float32(1e-3)
    assert rel_rms(round_trip(tiny, qtype), tiny) < 1.25 * rel_rms(base, x)
    assert not round_trip(x * np.float32(1e-20), qtype).any()


def test_nan_inf_and_out_of_range_values_are_errors_naming_the_tensor():
    x = GAUSSIAN[:4, :512].copy()
    x[2, 7] = np.nan
    with pytest.raises(QuantizeError, match=r"^tensor 'blocks.0.ffn.0.weight': holds nan at \[2, 7\]"):
        quantize(x, "Q4_K", name="blocks.0.ffn.0.weight")
    x[2, 7] = -np.inf
    with pytest.raises(QuantizeError, match=r"'w': holds -inf at \[2, 7\]"):
        quantize(x, "Q8_0", name="w")
    with pytest.raises(QuantizeError, match=r"'w': \|value\| reaches 1e\+05, beyond the float16 range"):
        quantize(np.full((1, 256), 1e5, np.float32), "IQ4_XS", name="w")
    assert quantize(np.full((1, 32), 1e5, np.float32), "BF16").shape == (1, 64)  # BF16 holds it
    with pytest.raises(QuantizeError, match=r"'w': rows of 300 values are not whole Q4_K blocks of 256"):
        quantize(np.zeros((2, 300), np.float32), "Q4_K", name="w")
    with pytest.raises(QuantizeError, match=r"unknown quantization type 'Q9_K'"):
        quantize(x, "Q9_K")


# --- the streaming writer ---------------------------------------------------------------


def test_the_streaming_writer_writes_write_gguf_bytes_and_refuses_a_bad_stream(tmp_path):
    x = GAUSSIAN[:4, :512]
    tensors = {"a": (x, Q.F32), "b": (x[:1, :256].copy(), Q.F16), "c": (quantize(x, "Q4_K"), Q.Q4_K)}
    write_gguf(tmp_path / "whole.gguf", "wan", tensors, metadata={"general.quantization_version": 2})
    layout = {"a": (x.shape, Q.F32), "b": ((1, 256), Q.F16), "c": (x.shape, Q.Q4_K)}
    raw = {name: quantize(array, qtype) if qtype != Q.Q4_K else array for name, (array, qtype) in tensors.items()}
    write_gguf_stream(tmp_path / "stream.gguf", "wan", layout, iter(raw.items()),
                      metadata={"general.quantization_version": 2})
    assert (tmp_path / "stream.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()

    bad_streams = {
        "out of order": [("b", raw["b"]), ("a", raw["a"])],
        "short": [("a", raw["a"]), ("b", raw["b"])],
        "wrong size": [("a", raw["a"][:2])],
    }
    for why, stream in bad_streams.items():
        with pytest.raises(ValueError, match="tensor '[abc]'"):
            write_gguf_stream(tmp_path / "bad.gguf", "wan", layout, iter(stream))
        assert not list(tmp_path.glob("bad.gguf*")), why


# --- the checkpoint, end to end ---------------------------------------------------------

CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_dim=16, out_dim=16, text_dim=64)
# Q4_K block weights against the float32 model: measured 0.024 relative (L2) on the output; with
# the LoRA merged (larger weights) against the float32 model + LoRA side path, 0.034.
Q4_K_REL = 0.035
MERGED_Q4_K_REL = 0.045
# F16 storage of every block weight (the rest stays F32), LoRA merged: measured 9e-5.
F16_REL = 3e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(state dict, path in the original names, path in diffusers' names) of a tiny random Wan DiT."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    root = tmp_path_factory.mktemp("checkpoint")
    with torch.device("meta"):
        meta = WanModel(CFG)
    state = random_state_dict(meta, torch.Generator().manual_seed(7))
    save_file(state, root / "wan.safetensors")
    theirs = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state.items()})
    assert "blocks.0.attn1.to_q.weight" in theirs and "scale_shift_table" in theirs
    save_file({k: v.contiguous() for k, v in theirs.items()}, root / "diffusers.safetensors")
    return state, root / "wan.safetensors", root / "diffusers.safetensors"


def dense(state: dict[str, torch.Tensor]) -> WanModel:
    with torch.device("meta"):
        model = WanModel(CFG)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def forward(model: WanModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)
    context = torch.randn(1, 12, 64, generator=gen)
    return model(x, torch.tensor([700.0]), context)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_original_and_diffusers_names_give_the_same_q4_k_file_close_to_float32(checkpoint, tmp_path, capsys):
    state, original, diffusers = checkpoint
    status, out, _ = run_cli(capsys, "quantize", original, tmp_path / "a.gguf", "--type", "Q4_K")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"{tmp_path / 'a.gguf'}: {len(state)} tensors, block weights Q4_K"
    assert [line.split()[:2] for line in lines[1:]] == [["F32", "32"], ["Q4_K", "10"]]
    assert all("MB in" in line and "MB/s" in line for line in lines[1:])
    assert run_cli(capsys, "quantize", diffusers, tmp_path / "b.gguf", "--type", "q4_k")[0] == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()

    reader = GGUFReader(tmp_path / "a.gguf")
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "wan"
    for t in reader.tensors:  # the community layout: 2-D block weights quantized, the rest F32
        shape = tuple(int(s) for s in reversed(t.shape))
        assert t.tensor_type == community_qtype(t.name, shape, "Q4_K"), t.name
    assert {t.name for t in reader.tensors} == set(state)

    ours = forward(load_dit(tmp_path / "a.gguf"))
    reference = forward(dense(state))
    assert 0.005 < rel(ours, reference) < Q4_K_REL


def lora_file(path, state: dict[str, torch.Tensor], rank: int = 4, extra: dict | None = None):
    """A ComfyUI-layout LoRA on three block weights (one of them the FFN's), a bias delta and a
    modulation delta, large enough to move the output far more than Q4_K does."""
    gen = torch.Generator().manual_seed(13)
    tensors = {}
    for target in ("blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.0"):
        out_features, in_features = state[f"{target}.weight"].shape
        tensors[f"diffusion_model.{target}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) / 8
        tensors[f"diffusion_model.{target}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) / 8
        tensors[f"diffusion_model.{target}.alpha"] = torch.tensor(2.0 * rank)
    tensors["diffusion_model.blocks.0.ffn.2.diff_b"] = torch.randn(256, generator=gen) * 0.2
    tensors["diffusion_model.blocks.0.diff_m"] = torch.randn(1, 6, 256, generator=gen) * 0.2
    save_file(tensors | (extra or {}), path)
    return path


def test_merge_then_quantize_tracks_the_lora_side_path(checkpoint, tmp_path, capsys):
    state, original, _ = checkpoint
    lora = lora_file(tmp_path / "style.safetensors", state)
    model = dense(state)
    with applied(model, [(read_lora(lora), 0.8)]):
        reference = forward(model)
    assert rel(forward(model), reference) > 0.2  # the LoRA moves the output a lot

    outputs = {}
    for name, args in {"merged_q4": ["--type", "Q4_K", "--lora", f"{lora}:0.8"], "plain_q4": ["--type", "Q4_K"],
                       "merged_f16": ["--type", "F16", "--lora", f"{lora}:0.8"],
                       "wrong_strength": ["--type", "F16", "--lora", f"{lora}:0.6"]}.items():
        status, out, err = run_cli(capsys, "quantize", original, tmp_path / f"{name}.gguf", *args)
        assert status == 0, err
        outputs[name] = forward(load_dit(tmp_path / f"{name}.gguf"))
    assert "1 LoRA merged" in out
    assert rel(outputs["merged_q4"], reference) < MERGED_Q4_K_REL
    assert rel(outputs["plain_q4"], reference) > 5 * rel(outputs["merged_q4"], reference)  # measured 0.264
    assert rel(outputs["merged_f16"], reference) < F16_REL
    assert rel(outputs["wrong_strength"], reference) > 30 * F16_REL


def test_a_lora_key_that_matches_no_tensor_is_one_line_naming_file_and_key(checkpoint, tmp_path, capsys):
    state, original, _ = checkpoint
    lora = lora_file(tmp_path / "bad.safetensors", state,
                     extra={"diffusion_model.blocks.7.self_attn.q.diff": torch.zeros(256, 256)})
    status, out, err = run_cli(capsys, "quantize", original, tmp_path / "x.gguf", "--lora", lora)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert str(lora) in err and "'diffusion_model.blocks.7.self_attn.q.diff'" in err
    assert not (tmp_path / "x.gguf").exists()


def test_bad_inputs_are_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    state, original, _ = checkpoint
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(4, 4)}, other)
    nan = tmp_path / "nan.safetensors"
    save_file(state | {"blocks.0.ffn.0.weight": torch.full((512, 256), math.nan)}, nan)
    extra = tmp_path / "extra.safetensors"
    save_file(state | {"blocks.0.scale_weight": torch.ones(1)}, extra)
    cases = {
        (tmp_path / "missing.safetensors", "Q4_K"): "missing.safetensors: no such file",
        (text, "Q4_K"): "notes.safetensors: not a safetensors file",
        (other, "Q4_K"): "vae.safetensors: not a Wan DiT (no 'blocks.0.self_attn.q.weight'",
        (original, "Q7_K"): "out.gguf: unknown quantization type 'Q7_K'",
        (nan, "Q4_K"): "tensor 'blocks.0.ffn.0.weight': holds nan at [0, 0]",
        (extra, "Q4_K"): "extra.safetensors: tensor 'blocks.0.scale_weight' is not part of a Wan DiT",
    }
    for (src, qtype), message in cases.items():
        status, out, err = run_cli(capsys, "quantize", src, tmp_path / "out.gguf", "--type", qtype)
        assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert message in err, (message, err)
        assert not list(tmp_path.glob("out.gguf*"))
