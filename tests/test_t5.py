"""umT5 encoder: ours against transformers' UMT5EncoderModel, loaded from real HF-layout safetensors and llama.cpp-layout GGUF files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, MODEL_ARCH, get_tensor_name_map
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import save_file

from engine.wan.t5 import (
    UMT5_XXL,
    TextEncoderError,
    UMT5Config,
    UMT5Encoder,
    encode_text,
    hf_to_llama,
    infer_config,
    llama_to_hf,
    load_text_encoder,
)
from engine.wan.convert.t5 import train_tiny_tokenizer, write_umt5_gguf
from engine.wan.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# float32 end to end on the same weights: only summation order differs.
ATOL, RTOL = 5e-5, 1e-5
LENGTH = 160  # > max_distance 128: the clamped log-spaced buckets are exercised


@pytest.fixture(scope="module")
def spm_proto() -> bytes:
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_model(spm_proto: bytes) -> torch.nn.Module:
    vocab = Tokenizer(spm_proto).vocab_size + 8  # embedding rows beyond the pieces, as umT5 has
    config = transformers.UMT5Config(
        vocab_size=vocab, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
    )
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(config).eval()
    # Random everything, norms included (their init is all ones, which would test nothing);
    # scales that keep the unscaled attention logits at a few units, as trained T5 weights do.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name == "shared.weight":
                p.normal_(0.0, 1.0)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def batch(hf_model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf_model.config.vocab_size, (3, LENGTH), generator=g)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    mask[1, 100:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 0  # the pad id, as a tokenizer pads
    return ids, mask


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def expected(hf_model, batch) -> torch.Tensor:
    return reference(hf_model, *batch)


def run(model: UMT5Encoder, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch)


def test_transformers_umt5_does_not_scale_attention(hf_model):
    # T5 folds 1/sqrt(d) into the initialisation; our forward relies on it.
    attention = hf_model.encoder.block[0].layer[0].SelfAttention
    assert attention.scaling == 1.0
    assert all(block.layer[0].SelfAttention.has_relative_attention_bias for block in hf_model.encoder.block)


@pytest.mark.parametrize("embedding", ["shared", "embed_tokens", "both"])
def test_safetensors_in_hf_layout_matches_transformers(tmp_path, hf_model, batch, expected, embedding):
    state = hf_state_dict(hf_model)
    table = state.pop("shared.weight")
    state.pop("encoder.embed_tokens.weight")
    if embedding in ("shared", "both"):
        state["shared.weight"] = table
    if embedding in ("embed_tokens", "both"):
        state["encoder.embed_tokens.weight"] = table.clone()
    path = tmp_path / "umt5.safetensors"
    save_file(state, path)

    model = load_text_encoder(path)
    assert model.config == UMT5Config(vocab=hf_model.config.vocab_size, dim=64, heads=4, head_dim=16,
                                      ffn_dim=128, num_layers=2)
    torch.testing.assert_close(run(model, batch), expected, atol=ATOL, rtol=RTOL)


def test_safetensors_fp16_file_loads_into_any_float_dtype(tmp_path, hf_model, batch):
    state = {k: v.half() for k, v in hf_state_dict(hf_model).items() if k != "encoder.embed_tokens.weight"}
    path = tmp_path / "umt5_fp16.safetensors"
    save_file(state, path)

    rounded = transformers.UMT5EncoderModel(hf_model.config).eval()
    rounded.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    rounded.tie_weights()
    want = reference(rounded, *batch)
    torch.testing.assert_close(run(load_text_encoder(path, dtype=torch.float32), batch), want, atol=ATOL, rtol=RTOL)

    bf16 = load_text_encoder(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    got = run(bf16, batch).float()
    # bf16 carries 8 mantissa bits: about 1% per op, a few percent after 2 layers.
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_gguf_matches_transformers_with_both_policies(tmp_path, hf_model, batch, spm_proto, quant):
    path = tmp_path / f"umt5-{quant}.gguf"
    write_umt5_gguf(hf_state_dict(hf_model), spm_proto, path, quant=quant)

    # The oracle: transformers on the weights as stored (dequantized by gguf-py).
    reader = GGUFReader(path)
    stored = {}
    for t in reader.tensors:
        array = gguf_dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        stored[llama_to_hf(t.name)] = torch.from_numpy(np.array(array, dtype=np.float32))
    oracle = transformers.UMT5EncoderModel(hf_model.config).eval()
    missing, unexpected = oracle.load_state_dict(stored, strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected
    oracle.tie_weights()
    want = reference(oracle, *batch)
    if quant == "F32":
        torch.testing.assert_close(want, reference(hf_model, *batch), atol=0, rtol=0)

    once = run(load_text_encoder(path, policy="dequantize_once"), batch)
    on_the_fly = run(load_text_encoder(path, policy="on_the_fly"), batch)
    torch.testing.assert_close(once, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(once, on_the_fly)


def test_write_umt5_gguf_is_llama_cpp_layout_and_deterministic(tmp_path, hf_model, spm_proto):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_umt5_gguf(hf_state_dict(hf_model), spm_proto, a)
    write_umt5_gguf(hf_state_dict(hf_model), spm_proto, b)
    assert a.read_bytes() == b.read_bytes()

    reader = GGUFReader(a)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "t5encoder"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "t5"
    charsmap = fields["tokenizer.ggml.precompiled_charsmap"]
    assert charsmap.types == [GGUFValueType.ARRAY, GGUFValueType.UINT8]
    assert len(charsmap.data) > 1000  # the NFKC map of the tiny model's normalizer
    assert int(fields["t5encoder.block_count"].parts[-1][0]) == 2
    assert int(fields["t5encoder.attention.head_count"].parts[-1][0]) == 4
    assert int(fields["t5encoder.attention.relative_buckets_count"].parts[-1][0]) == 32
    assert len(fields["tokenizer.ggml.tokens"].data) == hf_model.config.vocab_size

    # Names as gguf-py's own T5ENCODER table maps the HF names.
    name_map = get_tensor_name_map(MODEL_ARCH.T5ENCODER, 2)
    hf_names = [n for n in hf_model.state_dict() if n != "encoder.embed_tokens.weight"]
    want_names = {name_map.get_name(n, try_suffixes=(".weight",)) for n in hf_names}
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert set(types) == want_names
    assert reader.tensors[0].name == "token_embd.weight"
    for name, qtype in types.items():
        quantized = name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_o.weight",
                                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")) or name == "token_embd.weight"
        assert qtype == (GGMLQuantizationType.Q8_0 if quantized else GGMLQuantizationType.F32), name


def test_llama_cpp_names_follow_the_substitution_table(hf_model):
    # REFERENCES.md: substring replacements, in this order.
    table = [("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
             ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
             ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
             ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
             ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
             ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_up", "layer.1.DenseReluDense.wi_1"),
             ("ffn_down", "layer.1.DenseReluDense.wo"), ("ffn_norm", "layer.1.layer_norm")]
    ours = UMT5Encoder(infer_config({k: tuple(v.shape) for k, v in hf_model.state_dict().items()}))
    for name in ours.state_dict():
        llama = hf_to_llama(name)
        substituted = llama
        for old, new in table:
            substituted = substituted.replace(old, new)
        assert llama_to_hf(llama) == name == substituted
    assert hf_to_llama("encoder.embed_tokens.weight") == "token_embd.weight"
    assert llama_to_hf("enc.blk.0.something_else.weight") == "enc.blk.0.something_else.weight"


def test_infer_config_gives_umt5_xxl_from_its_shapes():
    c = UMT5_XXL
    shapes = {"shared.weight": (c.vocab, c.dim), "encoder.final_layer_norm.weight": (c.dim,)}
    for i in range(c.num_layers):
        p = f"encoder.block.{i}.layer."
        shapes |= {p + "0.SelfAttention.q.weight": (c.heads * c.head_dim, c.dim),
                   p + "0.SelfAttention.relative_attention_bias.weight": (c.num_buckets, c.heads),
                   p + "1.DenseReluDense.wi_0.weight": (c.ffn_dim, c.dim)}
    assert infer_config(shapes) == UMT5Config(vocab=256384, dim=4096, heads=64, head_dim=64, ffn_dim=10240,
                                              num_layers=24, num_buckets=32, max_distance=128, eps=1e-6)


def test_encode_text_trims_to_the_prompt_and_zero_pads_to_512(tmp_path, hf_model, spm_proto):
    path = tmp_path / "umt5.safetensors"
    save_file({k: v for k, v in hf_state_dict(hf_model).items() if k != "encoder.embed_tokens.weight"}, path)
    model, tokenizer = load_text_encoder(path), Tokenizer(spm_proto)
    prompt = "A red fox runs across a snowy forest; cinematic lighting."
    ids = tokenizer.encode(prompt)
    n = len(ids)

    context = encode_text(tokenizer, model, prompt)

    assert context.shape == (512, 64) and context.dtype == torch.float32
    assert torch.count_nonzero(context[n:]) == 0
    # Wan's way: the prompt padded to 512 with a mask through transformers, trimmed to n tokens.
    padded = torch.tensor([ids + [tokenizer.pad_id] * (512 - n)])
    mask = (torch.arange(512) < n).long()[None]
    torch.testing.assert_close(context[:n], reference(hf_model, padded, mask)[0, :n], atol=ATOL, rtol=RTOL)

    # A shorter context truncates the prompt and keeps EOS last, as the tokenizer does.
    assert n > 8
    short = encode_text(tokenizer, model, prompt, text_len=8)
    truncated = torch.tensor([ids[:7] + [tokenizer.eos_id]])
    torch.testing.assert_close(short, reference(hf_model, truncated, torch.ones_like(truncated))[0], atol=ATOL, rtol=RTOL)


def test_missing_or_misshaped_tensor_is_named(tmp_path, hf_model):
    state = {k: v for k, v in hf_state_dict(hf_model).items() if k != "encoder.embed_tokens.weight"}
    missing = dict(state)
    del missing["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(TextEncoderError, match=r"missing\.safetensors.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        load_text_encoder(tmp_path / "missing.safetensors")

    no_bias = dict(state)
    del no_bias["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    save_file(no_bias, tmp_path / "t5_shared_bias.safetensors")
    with pytest.raises(TextEncoderError, match=r"t5_shared_bias\.safetensors: missing tensor .*block\.0\..*relative_attention_bias"):
        load_text_encoder(tmp_path / "t5_shared_bias.safetensors")

    bad = dict(state)
    bad["encoder.block.1.layer.0.SelfAttention.k.weight"] = torch.zeros(32, 64)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(TextEncoderError, match=r"SelfAttention\.k\.weight.*\[32, 64\].*\[64, 64\]"):
        load_text_encoder(tmp_path / "bad.safetensors")

    extra = dict(state, **{"encoder.block.0.adapter.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(TextEncoderError, match=r"unexpected.*adapter"):
        load_text_encoder(tmp_path / "extra.safetensors")


def test_gguf_with_missing_tensor_or_wrong_architecture_is_refused_and_t5_decoder_skipped(tmp_path, hf_model, spm_proto):
    from engine.gguf import write_gguf

    path = tmp_path / "umt5.gguf"
    write_umt5_gguf(hf_state_dict(hf_model), spm_proto, path, quant="F32")
    reader = GGUFReader(path)
    tensors = {t.name: (np.array(t.data).reshape([int(n) for n in reversed(t.shape)]), GGMLQuantizationType.F32)
               for t in reader.tensors if t.name != "enc.blk.0.attn_v.weight"}
    write_gguf(tmp_path / "missing.gguf", "t5encoder", tensors)
    with pytest.raises(TextEncoderError, match=r"missing\.gguf.*enc\.blk\.0\.attn_v\.weight"):
        load_text_encoder(tmp_path / "missing.gguf")
    write_gguf(tmp_path / "wan.gguf", "wan", tensors)
    with pytest.raises(TextEncoderError, match=r"wan\.gguf.*'wan'"):
        load_text_encoder(tmp_path / "wan.gguf")

    # A full T5 conversion (architecture "t5") carries the decoder too: its encoder half loads.
    full = {t.name: (np.array(t.data).reshape([int(n) for n in reversed(t.shape)]), GGMLQuantizationType.F32)
            for t in reader.tensors}
    full["dec.blk.0.attn_q.weight"] = (np.ones((64, 64), np.float32), GGMLQuantizationType.F32)
    full["output.weight"] = (np.ones((8, 64), np.float32), GGMLQuantizationType.F32)
    write_gguf(tmp_path / "t5.gguf", "t5", full)
    encoder = load_text_encoder(tmp_path / "t5.gguf")
    torch.testing.assert_close(encoder.encoder.block[1].layer[1].DenseReluDense.wo.weight,
                               hf_model.encoder.block[1].layer[1].DenseReluDense.wo.weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["umt5.pth", "umt5.pt", "pytorch_model.bin", "umt5.ckpt", "umt5.onnx"])
def test_pickle_and_unknown_formats_are_refused_unopened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not opened")
    with pytest.raises(TextEncoderError, match=name.replace(".", r"\.")):
        load_text_encoder(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path, hf_model, batch, expected):
    path = tmp_path / "umt5.safetensors"
    save_file({k: v for k, v in hf_state_dict(hf_model).items() if k != "encoder.embed_tokens.weight"}, path)
    model = load_text_encoder(path, device="cuda")
    ids, mask = batch
    with torch.no_grad():
        got = model(ids.cuda(), mask.cuda()).cpu()
    # TF32 matmuls are off by default for float32 in torch; allow a GPU's different summation order.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
