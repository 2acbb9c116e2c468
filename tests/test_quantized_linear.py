"""QuantizedLinear and load_gguf_into: both weight policies give nn.Linear's output on the dequantized weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize
from torch import nn

from engine.gguf import GGUFFile, GGUFFormatError, write_gguf
from engine.gguf.linear import QuantizedEmbedding, QuantizedLinear, load_gguf_into

# Byte offsets of the float16 scales in each block (ggml-common.h).
F16_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,), Q.Q5_K: (0, 2)}
DIM, FFN = 256, 512


def raw_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A `[rows, cols]` weight as random blocks with small float16 scales: `[rows, bytes per row]` uint8."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = (rng.standard_normal(n) * 0.002).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


def reference_weight(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf_dequantize(raw.reshape(-1), qtype), dtype=np.float32).reshape(shape))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS], ids=lambda t: t.name)
def test_quantized_linear_equals_nn_linear_on_the_dequantized_weight(qtype: Q):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out_features, in_features = 48, 512
    if qtype in F16_SCALE_OFFSETS:
        raw = raw_blocks(qtype, out_features, in_features, rng)
    else:
        raw = gguf_quantize(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05, qtype)
    weight = reference_weight(raw, qtype, (out_features, in_features))
    bias = torch.randn(out_features)
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    layer = QuantizedLinear(torch.from_numpy(raw.reshape(-1)), qtype, (out_features, in_features), bias=bias.clone())
    x = torch.randn(3, 7, in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))  # exact: the same weight values, the same kernel
        # In bfloat16 the weight is dequantized in float32 then rounded, as .to() would.
        xb = x.to(torch.bfloat16)
        expected = nn.functional.linear(xb, weight.to(torch.bfloat16), bias.to(torch.bfloat16))
        assert layer(xb).dtype == torch.bfloat16 and torch.equal(layer(xb), expected)


def test_quantized_linear_without_bias_and_its_buffers():
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(gguf_quantize(rng.standard_normal((16, 64)).astype(np.float32), Q.Q8_0).reshape(-1))
    layer = QuantizedLinear(raw, Q.Q8_0, (16, 64))
    assert layer.bias is None and layer.raw.data_ptr() == raw.data_ptr()
    assert "raw" not in layer.state_dict()  # the blocks come from the file, never from a state dict
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), x @ layer.dequantized_weight().T)
    assert "Q8_0" in repr(layer)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.IQ4_XS], ids=lambda t: t.name)
def test_quantized_embedding_rows_equal_the_dequantized_table(qtype: Q):
    rng = np.random.default_rng(2)
    vocab, dim = 97, 512
    if qtype in F16_SCALE_OFFSETS:
        raw = raw_blocks(qtype, vocab, dim, rng)
    else:
        raw = gguf_quantize(rng.standard_normal((vocab, dim)).astype(np.float32), qtype)
    table = reference_weight(raw, qtype, (vocab, dim))
    flat = torch.from_numpy(raw.reshape(-1))
    embedding = QuantizedEmbedding(flat, qtype, (vocab, dim))
    assert embedding.raw.data_ptr() == flat.data_ptr()  # the blocks are viewed, not copied
    ids = torch.tensor([[0, 5, 96, 5], [17, 17, 3, 0]])  # repeats, first and last row
    assert torch.equal(embedding(ids), nn.functional.embedding(ids, table))  # bit-exact: same rows, same blocks
    half = QuantizedEmbedding(flat, qtype, (vocab, dim), dtype=torch.bfloat16)
    assert torch.equal(half(ids), nn.functional.embedding(ids, table).to(torch.bfloat16))


def test_on_the_fly_keeps_a_quantized_embedding_table_quantized(tmp_path: Path):
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(64, 256)
            self.proj = nn.Linear(256, 8)

        def forward(self, ids):
            return self.proj(self.shared(ids))

    rng = np.random.default_rng(3)
    path = tmp_path / "lookup.gguf"
    write_gguf(path, "t5encoder", {
        "shared.weight": (rng.standard_normal((64, 256)).astype(np.float32), Q.Q8_0),
        "proj.weight": (rng.standard_normal((8, 256)).astype(np.float32), Q.F32),
        "proj.bias": (np.zeros(8, dtype=np.float32), Q.F32),
    })
    models = {}
    for policy in ("dequantize_once", "on_the_fly"):
        with torch.device("meta"):
            models[policy] = Lookup()
        load_gguf_into(models[policy], path, policy=policy)
    assert isinstance(models["on_the_fly"].shared, QuantizedEmbedding)
    assert type(models["dequantize_once"].shared) is nn.Embedding
    ids = torch.tensor([[1, 63, 0, 1]])
    with torch.no_grad():
        assert torch.equal(models["on_the_fly"](ids), models["dequantize_once"](ids))


class Block(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation.unbind(1)
        return x + self.ffn(self.norm(x) * (1 + scale) + shift)


class TinyModel(nn.Module):
    """Wan-like names: a 5-D Conv3d patch embedding, blocks with ffn.0/ffn.2 and .modulation, a head."""

    def __init__(self, dim: int = DIM, ffn: int = FFN):
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([Block(dim, ffn) for _ in range(2)])
        self.head = nn.Linear(dim, 8)
        self.register_buffer("out_scale", torch.empty(8))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(video).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.out_scale


def tiny_tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q]]:
    def f32(*shape: int, scale: float = 0.05) -> tuple[np.ndarray, Q]:
        return (rng.standard_normal(shape).astype(np.float32) * scale, Q.F32)

    tensors = {"patch_embedding.weight": f32(DIM, 4, 1, 2, 2), "patch_embedding.bias": f32(DIM)}
    weight_types = [(Q.Q4_K, Q.Q8_0), (Q.Q5_0, Q.Q6_K)]
    for i, (t0, t2) in enumerate(weight_types):
        p = f"blocks.{i}."
        tensors[p + "norm.weight"] = f32(DIM, scale=1.0)
        tensors[p + "norm.bias"] = f32(DIM)
        for name, qtype, shape in ((p + "ffn.0.weight", t0, (FFN, DIM)), (p + "ffn.2.weight", t2, (DIM, FFN))):
            if qtype in F16_SCALE_OFFSETS:
                tensors[name] = (raw_blocks(qtype, *shape, rng), qtype)
            else:
                tensors[name] = (rng.standard_normal(shape).astype(np.float32) * 0.05, qtype)
        tensors[p + "ffn.0.bias"] = f32(FFN)
        tensors[p + "ffn.2.bias"] = f32(DIM)
        # Stored [1, 2, dim] in block 0 and [2, dim] in block 1: same values, size-1 axis dropped.
        tensors[p + "modulation"] = f32(1, 2, DIM) if i == 0 else f32(2, DIM)
    tensors["head.weight"] = (rng.standard_normal((8, DIM)).astype(np.float32) * 0.05, Q.F16)
    tensors["head.bias"] = f32(8)
    tensors["out_scale"] = f32(8, scale=1.0)
    return tensors


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, "wan", tiny_tensors(np.random.default_rng(2)))
    return path


def reference_model(path: Path) -> TinyModel:
    """The same model loaded the plain way: a CPU module and gguf-py's dequantized state dict."""
    model = TinyModel()
    state = {}
    for t in GGUFReader(path).tensors:
        values = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
        state[t.name] = torch.from_numpy(values.copy()).reshape(model.state_dict()[t.name].shape)
    model.load_state_dict(state)
    return model


def meta_model() -> TinyModel:
    with torch.device("meta"):
        return TinyModel()


def test_both_policies_equal_the_reference(tiny_file: Path):
    torch.manual_seed(0)
    video = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        expected = reference_model(tiny_file)(video)
        with GGUFFile(tiny_file) as f:
            once = load_gguf_into(meta_model(), f, policy="dequantize_once")
            fly = load_gguf_into(meta_model(), f, policy="on_the_fly")
            assert torch.equal(once(video), expected)
            assert torch.equal(fly(video), expected)

            # Only the quantized nn.Linear weights became QuantizedLinear; their blocks view the file.
            assert isinstance(fly.blocks[0].ffn[0], QuantizedLinear) and isinstance(fly.blocks[1].ffn[2], QuantizedLinear)
            assert type(fly.head) is nn.Linear and type(once.blocks[0].ffn[0]) is nn.Linear
            assert fly.blocks[0].ffn[0].raw.data_ptr() == f.raw("blocks.0.ffn.0.weight").data_ptr()
            # F32 tensors loaded as float32 on the CPU are views of the file, not copies.
            assert once.patch_embedding.weight.data_ptr() == f.raw("patch_embedding.weight").data_ptr()
    for model in (once, fly):
        assert not any(t.is_meta for t in model.state_dict().values())
        assert not any(p.requires_grad for p in model.parameters())


def test_policies_agree_in_bfloat16(tiny_file: Path):
    torch.manual_seed(0)
    video = torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16)
    once = load_gguf_into(meta_model(), tiny_file, dtype=torch.bfloat16)
    fly = load_gguf_into(meta_model(), tiny_file, dtype=torch.bfloat16, policy="on_the_fly")
    assert all(p.dtype == torch.bfloat16 for p in once.parameters())
    assert fly.blocks[0].ffn[0].bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(once(video), fly(video))  # the same bf16 weights either way


def write_variant(tmp_path: Path, change) -> Path:
    tensors = tiny_tensors(np.random.default_rng(3))
    change(tensors)
    path = tmp_path / "variant.gguf"
    write_gguf(path, "wan", tensors)
    return path


def test_missing_tensor_is_named(tmp_path: Path):
    path = write_variant(tmp_path, lambda t: t.pop("blocks.1.norm.bias"))
    with pytest.raises(GGUFFormatError, match=r"missing from the file: blocks\.1\.norm\.bias") as info:
        load_gguf_into(meta_model(), path)
    assert str(path) in str(info.value) and info.value.tensor == "blocks.1.norm.bias"


def test_unexpected_tensor_is_named_unless_skipped(tmp_path: Path):
    def add(t):
        t["vace_blocks.0.proj.weight"] = (np.zeros((4, 4), np.float32), Q.F32)

    path = write_variant(tmp_path, add)
    with pytest.raises(GGUFFormatError, match=r"does not have: vace_blocks\.0\.proj\.weight") as info:
        load_gguf_into(meta_model(), path)
    assert str(path) in str(info.value)
    model = load_gguf_into(meta_model(), path, skip=lambda name: name.startswith("vace_blocks."))
    assert not any(t.is_meta for t in model.state_dict().values())


def test_mis_shaped_tensor_names_both_shapes(tmp_path: Path):
    def reshape(t):
        t["head.weight"] = (np.zeros((4, 2 * DIM), np.float32), Q.F16)

    path = write_variant(tmp_path, reshape)
    with pytest.raises(GGUFFormatError, match=r"'head\.weight'.*\[4, 512\].*\[8, 256\]") as info:
        load_gguf_into(meta_model(), path, policy="on_the_fly")
    assert str(path) in str(info.value)


def test_rename_maps_file_names_onto_module_names(tmp_path: Path):
    def prefix(t):
        for name in list(t):
            t["model.diffusion_model.net." + name] = t.pop(name)

    path = write_variant(tmp_path, prefix)
    model = load_gguf_into(meta_model(), path, rename=lambda name: name.removeprefix("net."), policy="on_the_fly")
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 1, 4, 4)).shape == (1, 4, 8)


def test_tied_parameters_are_filled_together(tmp_path: Path):
    class Table(nn.Module):  # an nn.Embedding's parameter, without its (slow on meta) init
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(10, 4))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = Table()
            self.encoder = nn.Module()
            self.encoder.embed_tokens = self.shared  # the same module under two names (HF T5)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.shared.weight  # one Parameter in two modules

    path = tmp_path / "tied.gguf"
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    write_gguf(path, "t5encoder", {"shared.weight": (table, Q.F32)})
    with torch.device("meta"):
        model = Tied()
    load_gguf_into(model, path)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.lm_head.weight is model.shared.weight
    assert model.shared.weight.tolist() == table.tolist()


def test_a_tied_quantized_table_stays_one_dense_tensor_on_the_fly(tmp_path: Path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(8, 32)
            self.encoder = nn.Module()
            self.encoder.embed_tokens = self.shared

    path = tmp_path / "tied-q.gguf"
    write_gguf(path, "t5encoder", {"shared.weight": (np.ones((8, 32), dtype=np.float32), Q.Q8_0)})
    with torch.device("meta"):
        model = Tied()
    load_gguf_into(model, path, policy="on_the_fly")
    assert type(model.shared) is nn.Embedding and model.encoder.embed_tokens is model.shared
    assert torch.equal(model.shared.weight, GGUFFile(path).dequantize("shared.weight"))


def test_unknown_policy_is_rejected(tiny_file: Path):
    with pytest.raises(ValueError, match="unknown weight policy 'lazy'"):
        load_gguf_into(meta_model(), tiny_file, policy="lazy")  # type: ignore[arg-type]
