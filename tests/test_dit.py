"""The Wan DiT against diffusers' WanTransformer3DModel, and its community-layout GGUF files.

The oracle is a tiny random diffusers model (heads 2 x head dim 128, ffn 512,
2 layers, text_dim 64) in the three channel layouts: 16 -> 16 (Wan2.1 T2V, the
Wan2.2 T2V-A14B experts), 48 -> 48 with per-token timesteps (Wan2.2 TI2V-5B)
and 36 -> 16 (the Wan2.2 I2V-A14B experts; with the image branch, image_dim 32,
Wan2.1 I2V-14B). Its weights, renamed to the original Wan names, go into our
`WanModel` directly and through GGUF files that we write; diffusers' own GGUF
loader reads the same files.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from engine.gguf import GGUFFile
from engine.wan.convert.dit import community_qtype, write_dit_gguf
from engine.gguf.linear import QuantizedLinear
from engine.wan.dit import (
    WAN_CONFIGS,
    ModelConfigError,
    WanConfig,
    WanModel,
    config_name,
    expected_shapes,
    infer_config,
    load_dit,
    rope_axis_dims,
)

Q = GGMLQuantizationType
TINY_HEADS = {"wan.attention.head_count": 2}

# diffusers name fragment -> original Wan name fragment, applied in order
# (diffusers calls the affine cross-attention norm `norm2`, the original `norm3`;
# the image embedder's names go first, its own `norm2` being img_emb.proj.4).
DIFFUSERS_TO_WAN = [
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
    ("proj_out.", "head.head."),
]


def to_wan_names(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in diffusers_state.items():
        if name == "scale_shift_table":
            name = "head.modulation"
        for old, new in DIFFUSERS_TO_WAN:
            name = name.replace(old, new)
        out[name] = tensor.detach().clone()
    return out


def tiny_diffusers_model(root, in_channels: int, out_channels: int, **image_branch):
    """(diffusers model, its weights under the original Wan names, root); its config.json goes to root/config/.
    `image_branch`: diffusers' `image_dim` and `added_kv_proj_dim` for a Wan2.1 I2V model."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=in_channels,
        out_channels=out_channels, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, **image_branch,
    ).eval().requires_grad_(False)
    # The official init zeroes the head and sets norms to 1: re-randomise every
    # parameter (norm affines and modulation tables included) so all of them count.
    gen = torch.Generator().manual_seed(1)
    for name, p in ref.named_parameters():
        scale = 0.5 if p.ndim == 1 or "scale_shift_table" in name else 1.0 / math.sqrt(p[0].numel())
        p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
    ref.save_config(root / "config")
    return ref, to_wan_names(ref.state_dict()), root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 16 -> 16 model (Wan2.1 T2V layout)."""
    return tiny_diffusers_model(tmp_path_factory.mktemp("dit"), 16, 16)


def inputs(batch: int = 2, channels: int = 16):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, 3, 8, 8, generator=gen)
    t = torch.tensor([999.0, 500.0][:batch])
    context = torch.randn(batch, 512, 64, generator=gen)
    for i, length in enumerate([7, 12][:batch]):
        context[i, length:] = 0  # Wan zero-pads the umT5 output to 512 tokens
    return x, t, context


def dense_model(state: dict[str, torch.Tensor]) -> WanModel:
    cfg = infer_config({n: tuple(v.shape) for n, v in state.items()}, TINY_HEADS)
    model = WanModel(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def test_tiny_config_is_inferred_from_the_diffusers_weights(tiny):
    _, state, _ = tiny
    cfg = infer_config({n: tuple(v.shape) for n, v in state.items()}, TINY_HEADS)
    assert cfg == WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64)
    assert set(state) == set(expected_shapes(cfg))


@torch.no_grad()
def test_forward_matches_diffusers_float32(tiny):
    ref, state, _ = tiny
    model = dense_model(state)
    x, t, context = inputs()
    expected = ref(x, t, context, return_dict=False)[0]
    got = model(x, t, context)
    assert got.shape == (2, 16, 3, 8, 8) and got.dtype == torch.float32
    assert expected.abs().max() > 0.5  # the head is not zero: every weight takes part
    # float32 throughout; the two differ only in the order of float32 ops.
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)


@torch.no_grad()
def test_short_context_is_zero_padded_to_text_len(tiny):
    _, state, _ = tiny
    model = dense_model(state)
    x, t, context = inputs(batch=1)
    padded = model(x, t, context)
    short = model(x, t, context[:, :7])
    assert torch.equal(short, padded)
    # The padding is attended (official): a model padding to 7 tokens only differs.
    unpadded = WanModel(dataclasses.replace(model.config, text_len=7))
    unpadded.load_state_dict(state)
    assert (unpadded(x, t, context[:, :7]) - padded).abs().max() > 1e-3


def test_rope_split_over_frames_height_width():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(64) == (24, 20, 20)


def test_community_qtype_policy():
    assert community_qtype("blocks.0.self_attn.q.weight", (5120, 5120), "Q8_0") == Q.Q8_0
    assert community_qtype("blocks.3.ffn.2.weight", (5120, 13824), "Q4_K") == Q.Q4_K
    assert community_qtype("blocks.3.cross_attn.o.weight", (256, 256), Q.Q4_0) == Q.Q4_0
    # never quantized: 1-D, small, modulation, embeddings, projection, head
    assert community_qtype("blocks.0.self_attn.q.bias", (5120,), "Q8_0") == Q.F32
    assert community_qtype("blocks.0.self_attn.norm_q.weight", (5120,), "Q8_0") == Q.F32
    assert community_qtype("blocks.0.modulation", (1, 6, 5120), "Q8_0") == Q.F32
    assert community_qtype("blocks.0.tiny.weight", (32, 32), "Q8_0") == Q.F32
    for name in ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.weight",
                 "time_projection.1.weight", "head.head.weight", "img_emb.proj.1.weight"):
        assert community_qtype(name, (5120, 4096), "Q8_0") == Q.F32, name
    # the Wan2.1 I2V image keys / values are block weights like any other
    assert community_qtype("blocks.9.cross_attn.k_img.weight", (5120, 5120), "Q4_K") == Q.Q4_K
    assert community_qtype("blocks.9.cross_attn.norm_k_img.weight", (5120,), "Q4_K") == Q.F32
    # a row that is not a whole number of blocks falls back to F16
    assert community_qtype("blocks.0.ffn.0.weight", (512, 48), "Q8_0") == Q.F16
    assert community_qtype("blocks.0.ffn.0.weight", (512, 384), "Q4_K") == Q.F16


def test_written_file_has_the_community_layout(tiny):
    _, state, root = tiny
    path = root / "layout_q8.gguf"
    write_dit_gguf(state, path, "Q8_0")
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "wan"
    found = {t.name: (t.tensor_type, tuple(int(s) for s in reversed(t.shape))) for t in reader.tensors}
    assert set(found) == set(state)
    assert found["patch_embedding.weight"] == (Q.F32, (256, 16, 1, 2, 2))
    assert found["blocks.1.modulation"] == (Q.F32, (1, 6, 256))
    assert found["head.modulation"] == (Q.F32, (1, 2, 256))
    assert found["blocks.0.ffn.0.weight"] == (Q.Q8_0, (512, 256))
    assert found["blocks.1.cross_attn.k.weight"] == (Q.Q8_0, (256, 256))
    assert found["text_embedding.0.weight"] == (Q.F32, (256, 64))
    assert found["blocks.0.norm3.bias"] == (Q.F32, (256,))
    quantized = {n for n, (qt, _) in found.items() if qt == Q.Q8_0}
    assert quantized == {n for n, v in state.items() if n.startswith("blocks.") and v.ndim == 2}


@pytest.fixture(scope="module")
def files(tiny):
    _, state, root = tiny
    paths = {}
    for quant in ("F32", "Q8_0"):
        paths[quant] = root / f"tiny_{quant}.gguf"
        write_dit_gguf(state, paths[quant], quant, metadata=TINY_HEADS)
    return paths


@torch.no_grad()
def test_f32_file_loads_to_the_same_model(tiny, files):
    _, state, _ = tiny
    x, t, context = inputs()
    expected = dense_model(state)(x, t, context)
    model = load_dit(files["F32"])
    assert model.config == infer_config({n: tuple(v.shape) for n, v in state.items()}, TINY_HEADS)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # The same float32 weights through the same ops: the same bits.
    assert torch.equal(model(x, t, context), expected)


@torch.no_grad()
def test_q8_0_file_both_policies_match_the_dequantized_dense_model(tiny, files):
    _, state, _ = tiny
    x, t, context = inputs()
    once = load_dit(files["Q8_0"], policy="dequantize_once")(x, t, context)
    on_the_fly = load_dit(files["Q8_0"], policy="on_the_fly")(x, t, context)
    # The same dequantized values into the same matmuls: the same bits.
    assert torch.equal(on_the_fly, once)

    # Dense reference: each quantized weight round-tripped through gguf-py's Q8_0.
    rounded = {}
    for name, v in state.items():
        qtype = community_qtype(name, tuple(v.shape), "Q8_0")
        if qtype == Q.Q8_0:
            v = torch.from_numpy(dequantize(quantize(v.numpy(), Q.Q8_0), Q.Q8_0).reshape(v.shape).copy())
        rounded[name] = v
    expected = dense_model(rounded)(x, t, context)
    torch.testing.assert_close(once, expected, atol=1e-5, rtol=1e-5)
    # ...and Q8_0 does change the numbers a little (the file really is quantized).
    assert 0 < (once - dense_model(state)(x, t, context)).abs().max() < 0.1


def diffusers_from_gguf(path, config_dir):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    return WanTransformer3DModel.from_single_file(
        str(path), config=str(config_dir),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
    ).eval()


def q8_0_as_diffusers_dequantizes(weight: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q8_0 blocks of `weight`, dequantized as diffusers does: scale (f16) * q (int8) in float16."""
    blocks = quantize(weight.numpy(), Q.Q8_0).reshape(-1, 34)
    scale = torch.from_numpy(blocks[:, :2].copy().view(np.float16))
    q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8))
    return (scale * q).float().reshape(weight.shape)


@torch.no_grad()
def test_diffusers_gguf_loader_reads_our_files(tiny, files, monkeypatch):
    ref, state, root = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, t, context = inputs()

    # F32 file: diffusers and we read the same float32 weights (~1e-5 from op order).
    theirs = diffusers_from_gguf(files["F32"], root / "config")(x, t, context, return_dict=False)[0]
    ours = load_dit(files["F32"])(x, t, context)
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-5)

    # Q8_0 file: diffusers dequantizes Q8_0 as a float16 product (each weight
    # rounded to 11 bits), we in float32 as gguf-py does, so the outputs differ by
    # ~1e-3; against our model holding diffusers' float16-rounded weights it is ~1e-5.
    theirs = diffusers_from_gguf(files["Q8_0"], root / "config")(x, t, context, return_dict=False)[0]
    ours = load_dit(files["Q8_0"])(x, t, context)
    torch.testing.assert_close(ours, theirs, atol=5e-3, rtol=1e-3)
    rounded = {
        name: q8_0_as_diffusers_dequantizes(v) if community_qtype(name, tuple(v.shape), "Q8_0") == Q.Q8_0 else v
        for name, v in state.items()
    }
    torch.testing.assert_close(dense_model(rounded)(x, t, context), theirs, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@torch.no_grad()
def test_half_precision_compute_stays_close_to_float32(files, dtype, tolerance):
    x, t, context = inputs()
    full = load_dit(files["Q8_0"])(x, t, context)
    model = load_dit(files["Q8_0"], dtype=dtype)
    assert model.blocks[0].self_attn.q.weight.dtype == dtype
    assert model.text_embedding[0].weight.dtype == dtype
    # the official float32 regions stay float32
    assert model.time_projection[1].weight.dtype == torch.float32
    assert model.head.head.weight.dtype == torch.float32
    assert model.blocks[0].modulation.dtype == torch.float32
    half = model(x, t, context)
    assert half.dtype == torch.float32
    assert torch.equal(load_dit(files["Q8_0"], dtype=dtype, policy="on_the_fly")(x, t, context), half)
    # Max error relative to the output's scale (measured: bf16 3.3e-3, fp16 3.8e-4
    # over these two blocks; bf16 keeps 8 mantissa bits, fp16 11).
    err = (half - full).abs().max() / full.abs().max()
    assert err < tolerance, err


# --- Wan2.2: per-token timesteps (TI2V-5B, 48 -> 48), image channels (I2V-A14B, 36 -> 16) ---

# float32 on both sides from the same weights: only the order of float32 ops differs.
ATOL, RTOL = 5e-5, 1e-5


def assert_rejected(got: torch.Tensor, expected: torch.Tensor) -> None:
    """`got` (a deliberate mistake) is far outside the oracle tolerance, so the tolerance can fail."""
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert (got - expected).abs().max() > 1000 * ATOL


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """(diffusers 48 -> 48 model, Wan-named weights, config root, the weights as a real F32 GGUF file)."""
    ref, state, root = tiny_diffusers_model(tmp_path_factory.mktemp("ti2v"), 48, 48)
    path = root / "ti2v_F32.gguf"
    write_dit_gguf(state, path, "F32", metadata=TINY_HEADS)
    return ref, state, root, path


def ti2v_timesteps(t: torch.Tensor, grid: tuple[int, int, int], image_frames: int = 1) -> torch.Tensor:
    """[B] -> [B, f*h*w] as wan/textimage2video.py builds them: 0 on the image's latent frame(s), t elsewhere."""
    mask = torch.ones(grid)  # official mask2[0][0][:, ::2, ::2], over patch tokens
    mask[:image_frames] = 0
    return mask.flatten() * t[:, None]


@torch.no_grad()
def test_per_token_timesteps_match_diffusers_ti2v_through_gguf(ti2v, monkeypatch):
    ref, _, root, path = ti2v
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, t, context = inputs(channels=48)
    grid = (3, 4, 4)  # 3 x 8 x 8 latents, patch 1 x 2 x 2: 48 tokens
    per_token = ti2v_timesteps(t, grid)
    assert per_token.shape == (2, 48) and per_token[:, :16].abs().max() == 0 and per_token[:, 16:].min() == 500

    ours = load_dit(path)
    expected = diffusers_from_gguf(path, root / "config")(x, per_token, context, return_dict=False)[0]
    got = ours(x, per_token, context)
    assert got.shape == (2, 48, 3, 8, 8) and expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ref(x, per_token, context, return_dict=False)[0], expected, atol=ATOL, rtol=RTOL)

    # Mistakes the tolerance rejects: one timestep for every token (the first frame not at 0),
    # the first frame's timestep swapped with the rest's, the zero on the last frame instead of the first.
    assert_rejected(ours(x, t, context), expected)
    assert_rejected(ours(x, per_token.amax(1, keepdim=True) - per_token, context), expected)
    assert_rejected(ours(x, per_token.flip(1), context), expected)


@torch.no_grad()
def test_uniform_per_token_timesteps_equal_the_per_sample_path(ti2v):
    _, _, _, path = ti2v
    model = load_dit(path)
    x, t, context = inputs(channels=48)
    assert torch.equal(model(x, t[:, None].expand(2, 48), context), model(x, t, context))


@torch.no_grad()
def test_per_token_modulation_stays_one_row_per_distinct_timestep(ti2v):
    # The blocks gather a token's modulation when they use it; the table itself holds one row per
    # distinct timestep (2 here: the image frame's 0 and t), not one per token.
    _, _, _, path = ti2v
    model = load_dit(path)
    _, t, _ = inputs(channels=48)
    per_token = ti2v_timesteps(t[:1].expand(2), (3, 4, 4))
    e, e0, index = model.embed_time(per_token, 2, 48)
    assert e.shape == (2, model.config.dim) and e0.shape == (2, 6, model.config.dim)
    assert index.shape == (2, 48) and index[:, :16].unique().tolist() == [0] and index[:, 16:].unique().tolist() == [1]
    _, e0_sample, index_sample = model.embed_time(t, 2, 48)
    assert e0_sample.shape == (2, 6, model.config.dim) and index_sample.tolist() == [[0], [1]]


@pytest.mark.parametrize("shape", [(), (3,), (1,), (2, 47), (2, 49), (1, 48), (2, 48, 1)])
@torch.no_grad()
def test_wrong_timestep_shapes_are_refused_in_one_line(ti2v, shape):
    _, _, _, path = ti2v
    x, _, context = inputs(channels=48)
    with pytest.raises(ValueError) as info:
        load_dit(path)(x, torch.full(shape, 500.0), context)
    assert str(info.value) == (f"t has shape {list(shape)}; expected [2] (one timestep per sample) "
                               "or [2, 48] (one per patch token)")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """(diffusers 36 -> 16 model without an image embedding, as the Wan2.2 I2V-A14B experts, its F32 GGUF file)."""
    ref, state, root = tiny_diffusers_model(tmp_path_factory.mktemp("i2v"), 36, 16)
    path = root / "i2v_F32.gguf"
    write_dit_gguf(state, path, "F32", metadata=TINY_HEADS)
    return ref, path


@torch.no_grad()
def test_image_channels_36_to_16_match_diffusers(i2v):
    ref, path = i2v
    gen = torch.Generator().manual_seed(4)
    noise, _, context = inputs()
    mask = torch.zeros(2, 4, 3, 8, 8)
    mask[:, :, 0] = 1  # official msk: the given image is frame 0
    image = torch.randn(2, 16, 3, 8, 8, generator=gen)
    x = torch.cat([noise, mask, image], dim=1)  # [noise 16; mask 4; image latent 16], as the caller builds it
    t = torch.tensor([900.0, 900.0])

    model = load_dit(path)
    assert (model.config.in_dim, model.config.out_dim) == (36, 16)
    expected = ref(x, t, context, return_dict=False)[0]
    got = model(x, t, context)
    assert got.shape == (2, 16, 3, 8, 8) and expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # The channel order counts: [noise; image; mask] is rejected.
    assert_rejected(model(torch.cat([noise, image, mask], dim=1), t, context), expected)
    with pytest.raises(ValueError, match="^x has 16 channels, the DiT takes 36$"):
        model(noise, t, context)


# --- infer_config ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_published_configs_round_trip_through_their_shapes(name):
    cfg = WAN_CONFIGS[name]
    inferred = infer_config(expected_shapes(cfg))
    assert inferred == cfg
    assert inferred.head_dim == 128
    # The Wan2.2 A14B experts have exactly the T2V-14B shapes; the first name is returned.
    assert config_name(inferred) == ("t2v-14B" if name == "t2v-A14B" else name)


def test_published_sizes():
    assert (WAN_CONFIGS["t2v-1.3B"].dim, WAN_CONFIGS["t2v-1.3B"].num_heads, WAN_CONFIGS["t2v-1.3B"].num_layers) == (1536, 12, 30)
    assert (WAN_CONFIGS["i2v-A14B"].in_dim, WAN_CONFIGS["i2v-A14B"].out_dim) == (36, 16)
    ti2v = WAN_CONFIGS["ti2v-5B"]
    assert (ti2v.dim, ti2v.ffn_dim, ti2v.num_heads, ti2v.num_layers) == (3072, 14336, 24, 30)
    assert (ti2v.in_dim, ti2v.out_dim) == (48, 48)
    assert config_name(WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64)) is None


@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_published_models_have_the_tensors_of_their_shapes(name):
    with torch.device("meta"):
        model = WanModel(WAN_CONFIGS[name])
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected_shapes(WAN_CONFIGS[name])


def test_head_count_from_metadata():
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=1, in_dim=16, out_dim=16, text_dim=64)
    shapes = expected_shapes(cfg)
    assert infer_config(shapes).num_heads == 2  # dim // 128 without metadata
    assert infer_config(shapes, {"wan.attention.head_count": 4}).num_heads == 4


def test_missing_or_misshaped_tensors_are_named():
    shapes = expected_shapes(WAN_CONFIGS["t2v-1.3B"])
    with pytest.raises(ModelConfigError, match="patch_embedding.weight"):
        infer_config({n: s for n, s in shapes.items() if n != "patch_embedding.weight"})
    with pytest.raises(ModelConfigError, match="blocks.7.cross_attn.v.weight"):
        infer_config({n: s for n, s in shapes.items() if n != "blocks.7.cross_attn.v.weight"})
    with pytest.raises(ModelConfigError, match=r"blocks.3.ffn.2.weight.*\[1536, 8960\]"):
        infer_config({**shapes, "blocks.3.ffn.2.weight": (1536, 4480)})
    with pytest.raises(ModelConfigError, match="head dim 128"):
        infer_config({**shapes, "patch_embedding.weight": (1000, 16, 1, 2, 2)})


def test_load_dit_names_the_file_and_the_missing_tensor(tiny, tmp_path):
    _, state, _ = tiny
    path = tmp_path / "no_patch.gguf"
    write_dit_gguf({n: v for n, v in state.items() if not n.startswith("patch_embedding.")}, path, "F32")
    with pytest.raises(ModelConfigError, match=r"no_patch\.gguf.*'patch_embedding\.weight' is missing"):
        load_dit(path)


@pytest.fixture(scope="module")
def flf2v_file(wan21_i2v, tmp_path_factory):
    """A tiny Wan2.1 FLF2V DiT (the I2V branch plus `img_emb.emb_pos`)."""
    gen = torch.Generator().manual_seed(3)
    flf2v = {**wan21_i2v.state, "img_emb.emb_pos": torch.randn((1, 2 * 257, IMAGE_DIM), generator=gen)}
    path = tmp_path_factory.mktemp("variants") / "wan21_flf2v.gguf"
    write_dit_gguf(flf2v, path, "Q8_0", metadata=TINY_HEADS)
    return path


def test_flf2v_files_are_refused_in_one_line(flf2v_file):
    path, variant, tensor = flf2v_file, "Wan2.1 FLF2V", "img_emb.emb_pos"
    with pytest.raises(ModelConfigError) as info:
        load_dit(path)
    assert str(info.value) == f"{path}: a {variant} DiT (it has {tensor!r}): {variant} is not supported yet"
    with GGUFFile(path) as f:  # the header check the driver runs before Ray starts says the same
        with pytest.raises(ModelConfigError, match=f"^a {variant} DiT .*not supported yet$"):
            infer_config({name: f.shape(name) for name in f.tensor_names}, f.metadata)


# --- Wan2.1 I2V-14B: the image branch (img_emb, cross_attn.k_img / v_img / norm_k_img) ---

IMAGE_DIM = 32  # the CLIP width, 1280 in the published model


@dataclasses.dataclass
class I2VOracle:
    ref: object  # diffusers WanTransformer3DModel with image_dim and added_kv_proj_dim
    state: dict
    root: object
    files: dict  # "F32" / "Q8_0" -> community-layout GGUF path


@pytest.fixture(scope="module")
def wan21_i2v(tmp_path_factory):
    ref, _, root = tiny_diffusers_model(tmp_path_factory.mktemp("wan21_i2v"), 36, 16,
                                        image_dim=IMAGE_DIM, added_kv_proj_dim=256)
    # Image keys 4x larger than the re-randomised rest, so norm_k_img really rescales them
    # (skipping it makes the image attention 4x sharper): the norm-skipped mistake is then far off.
    for block in ref.blocks:
        block.attn2.add_k_proj.weight.mul_(4)
        block.attn2.add_k_proj.bias.mul_(4)
    state = to_wan_names(ref.state_dict())
    files = {quant: root / f"wan21_i2v_{quant}.gguf" for quant in ("F32", "Q8_0")}
    for quant, path in files.items():
        write_dit_gguf(state, path, quant, metadata=TINY_HEADS)
    return I2VOracle(ref, state, root, files)


def i2v_inputs():
    """x [2, 36, 3, 8, 8] = [noise; first-frame mask; image latent], t, the 512-token text context and
    257 CLIP tokens per sample: noise around a per-sample vector, as an image's tokens share its
    content (a different image then changes the output well beyond the tolerance)."""
    gen = torch.Generator().manual_seed(5)
    noise, _, context = inputs()
    mask = torch.zeros(2, 4, 3, 8, 8)
    mask[:, :, 0] = 1
    x = torch.cat([noise, mask, torch.randn(2, 16, 3, 8, 8, generator=gen)], dim=1)
    clip = torch.randn(2, 257, IMAGE_DIM, generator=gen) + 2 * torch.randn(2, 1, IMAGE_DIM, generator=gen)
    return x, torch.tensor([900.0, 400.0]), context, clip


def test_wan21_i2v_config_is_inferred_with_its_image_branch(wan21_i2v):
    cfg = infer_config({n: tuple(v.shape) for n, v in wan21_i2v.state.items()}, TINY_HEADS)
    assert cfg == WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=64,
                            image_dim=IMAGE_DIM)
    assert set(wan21_i2v.state) == set(expected_shapes(cfg))
    assert {n for n in wan21_i2v.state if "img" in n} >= {
        "img_emb.proj.0.bias", "img_emb.proj.4.weight", "blocks.1.cross_attn.k_img.weight",
        "blocks.1.cross_attn.v_img.bias", "blocks.1.cross_attn.norm_k_img.weight"}


@torch.no_grad()
def test_wan21_i2v_matches_diffusers_through_gguf(wan21_i2v, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, t, context, clip = i2v_inputs()
    path = wan21_i2v.files["F32"]
    theirs = diffusers_from_gguf(path, wan21_i2v.root / "config")
    assert theirs.condition_embedder.image_embedder is not None and theirs.blocks[0].attn2.add_k_proj is not None
    expected = theirs(x, t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
    model = load_dit(path)
    got = model(x, t, context, clip)
    assert got.shape == (2, 16, 3, 8, 8) and expected.abs().max() > 0.5
    # float32 on both sides from the same weights: only the order of float32 ops differs.
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    direct = wan21_i2v.ref(x, t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
    torch.testing.assert_close(direct, expected, atol=ATOL, rtol=RTOL)
    # A shorter text context is zero-padded to 512 before the image tokens are put in front.
    assert torch.equal(model(x, t, context[:, :12], clip), got)

    # Mistakes the tolerance rejects. Image tokens ignored: the same weights without the branch.
    text_only = WanModel(dataclasses.replace(model.config, image_dim=None))
    text_only.load_state_dict({n: v for n, v in wan21_i2v.state.items() if "img" not in n})
    assert_rejected(text_only(x, t, context), expected)
    # The other sample's image: each sample attends to its own CLIP tokens.
    assert_rejected(model(x, t, context, clip.flip(0)), expected)

    # Image tokens after the text instead of before (the split then takes text for image).
    def text_first(context, clip_features, dtype):
        full = WanModel.embed_context(model, context, clip_features, dtype)
        return torch.cat([full[:, -512:], full[:, :-512]], dim=1)

    with monkeypatch.context() as patch:
        patch.setattr(model, "embed_context", text_first)
        assert_rejected(model(x, t, context, clip), expected)
    assert torch.equal(model(x, t, context, clip), got)

    # norm_k_img skipped (its weights are random around 1, as every norm's here).
    for block in model.blocks:
        block.cross_attn.norm_k_img = torch.nn.Identity()
    assert_rejected(model(x, t, context, clip), expected)


@torch.no_grad()
def test_wan21_i2v_q8_0_file_both_policies(wan21_i2v, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x, t, context, clip = i2v_inputs()
    path = wan21_i2v.files["Q8_0"]
    with GGUFFile(path) as f:  # the community layout: image keys / values quantized, img_emb F32
        assert f.qtype("blocks.0.cross_attn.k_img.weight") == Q.Q8_0
        assert f.qtype("blocks.1.cross_attn.v_img.weight") == Q.Q8_0
        assert f.qtype("img_emb.proj.1.weight") == Q.F32 and f.qtype("img_emb.proj.3.weight") == Q.F32
    once = load_dit(path, policy="dequantize_once")
    fly = load_dit(path, policy="on_the_fly")
    assert isinstance(fly.blocks[0].cross_attn.k_img, QuantizedLinear)
    assert isinstance(fly.blocks[1].cross_attn.v_img, QuantizedLinear)
    assert type(fly.img_emb.proj[1]) is torch.nn.Linear  # stored F32: stays dense
    got = once(x, t, context, clip)
    # The same dequantized values into the same matmuls: the same bits.
    assert torch.equal(fly(x, t, context, clip), got)
    # diffusers dequantizes Q8_0 in float16, we in float32 (see test_diffusers_gguf_loader_reads_our_files).
    theirs = diffusers_from_gguf(path, wan21_i2v.root / "config")
    expected = theirs(x, t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=1e-3)
    assert 0 < (got - load_dit(wan21_i2v.files["F32"])(x, t, context, clip)).abs().max() < 0.1


@torch.no_grad()
def test_wan21_i2v_half_precision_keeps_the_norms_float32(wan21_i2v):
    x, t, context, clip = i2v_inputs()
    full = load_dit(wan21_i2v.files["Q8_0"])(x, t, context, clip)
    model = load_dit(wan21_i2v.files["Q8_0"], dtype=torch.bfloat16)
    assert model.img_emb.proj[1].weight.dtype == torch.bfloat16
    assert model.blocks[0].cross_attn.k_img.weight.dtype == torch.bfloat16
    assert model.img_emb.proj[0].weight.dtype == model.img_emb.proj[4].bias.dtype == torch.float32
    half = model(x, t, context.bfloat16(), clip.bfloat16())
    assert half.dtype == torch.float32
    fly = load_dit(wan21_i2v.files["Q8_0"], dtype=torch.bfloat16, policy="on_the_fly")
    assert torch.equal(fly(x, t, context.bfloat16(), clip.bfloat16()), half)
    err = (half - full).abs().max() / full.abs().max()
    assert err < 2e-2, err  # measured 3.3e-3, as T2V's (bf16 keeps 8 mantissa bits)


@torch.no_grad()
def test_image_features_and_image_branch_go_together(tiny, wan21_i2v):
    x, t, context, clip = i2v_inputs()
    model = load_dit(wan21_i2v.files["F32"])
    with pytest.raises(ValueError, match=r"^this DiT \(Wan2.1 I2V\) needs clip_features \[2, 257, 32\], "
                                         r"the CLIP tokens of the image$"):
        model(x, t, context)
    for bad in (clip[:1], clip[..., :16], clip[:, :0], clip[0]):
        with pytest.raises(ValueError, match=r"^clip_features has shape .*; expected \[2, 257, 32\]$"):
            model(x, t, context, bad)
    t2v = dense_model(tiny[1])
    with pytest.raises(ValueError, match=r"^clip_features given, but this DiT has no image branch \(img_emb\)"):
        t2v(x[:, :16], t, context, clip)


def test_published_wan21_i2v_shapes_give_i2v_14b():
    # The published Wan2.1 I2V-14B table, written out: the T2V-14B tensors with 36 input
    # channels, img_emb (CLIP width 1280) and each block's image keys / values.
    shapes = {**expected_shapes(WAN_CONFIGS["t2v-14B"]), "patch_embedding.weight": (5120, 36, 1, 2, 2)}
    shapes |= {"img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
               "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
               "img_emb.proj.3.weight": (5120, 1280), "img_emb.proj.3.bias": (5120,),
               "img_emb.proj.4.weight": (5120,), "img_emb.proj.4.bias": (5120,)}
    for b in range(40):
        shapes |= {f"blocks.{b}.cross_attn.k_img.weight": (5120, 5120), f"blocks.{b}.cross_attn.k_img.bias": (5120,),
                   f"blocks.{b}.cross_attn.v_img.weight": (5120, 5120), f"blocks.{b}.cross_attn.v_img.bias": (5120,),
                   f"blocks.{b}.cross_attn.norm_k_img.weight": (5120,)}
    cfg = infer_config(shapes)
    assert config_name(cfg) == "i2v-14B" and cfg.image_dim == 1280 and (cfg.in_dim, cfg.out_dim) == (36, 16)
    assert shapes == expected_shapes(cfg)
    # Without the branch the same table is the Wan2.2 I2V-A14B expert.
    assert config_name(infer_config({n: s for n, s in shapes.items() if "img" not in n})) == "i2v-A14B"
    # A partial branch names what is missing.
    with pytest.raises(ModelConfigError, match="'blocks.39.cross_attn.norm_k_img.weight' is missing"):
        infer_config({n: s for n, s in shapes.items() if n != "blocks.39.cross_attn.norm_k_img.weight"})
    with pytest.raises(ModelConfigError, match="'img_emb.proj.1.weight' is missing"):
        infer_config({n: s for n, s in shapes.items() if not n.startswith("img_emb.")})
    with pytest.raises(ModelConfigError, match=r"'img_emb.proj.4.bias' has shape \[1280\], expected \[5120\]"):
        infer_config({**shapes, "img_emb.proj.4.bias": (1280,)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_matches_cpu(files):
    x, t, context = inputs()
    cpu = load_dit(files["Q8_0"])(x, t, context)
    for policy in ("dequantize_once", "on_the_fly"):
        gpu = load_dit(files["Q8_0"], device="cuda", policy=policy)(x.cuda(), t.cuda(), context.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_wan21_i2v_matches_cpu(wan21_i2v):
    x, t, context, clip = i2v_inputs()
    cpu = load_dit(wan21_i2v.files["Q8_0"])(x, t, context, clip)
    for policy in ("dequantize_once", "on_the_fly"):
        gpu = load_dit(wan21_i2v.files["Q8_0"], device="cuda", policy=policy)
        got = gpu(x.cuda(), t.cuda(), context.cuda(), clip.cuda()).cpu()
        torch.testing.assert_close(got, cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_per_token_timesteps_match_cpu(ti2v):
    _, _, _, path = ti2v
    x, t, context = inputs(channels=48)
    per_token = ti2v_timesteps(t, (3, 4, 4))
    cpu = load_dit(path)(x, per_token, context)
    gpu_model = load_dit(path, device="cuda")
    gpu = gpu_model(x.cuda(), per_token.cuda(), context.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)
    # t may stay on the CPU; the uniform table still equals the per-sample path on the device.
    assert torch.equal(gpu_model(x.cuda(), per_token, context.cuda()), gpu)
    uniform = t[:, None].expand(2, 48).cuda()
    assert torch.equal(gpu_model(x.cuda(), uniform, context.cuda()), gpu_model(x.cuda(), t.cuda(), context.cuda()))
    half = load_dit(path, device="cuda", dtype=torch.bfloat16)(x.cuda(), per_token.cuda(), context.cuda())
    assert (half.cpu() - cpu).abs().max() / cpu.abs().max() < 2e-2
