"""The VACE DiT (Wan2.1 VACE 1.3B / 14B, the Wan2.2 VACE-Fun A14B experts) against diffusers'
WanVACETransformer3DModel, and its community-layout GGUF files.

The tiny model: dim 256 (2 heads of 128), 4 main blocks, 2 VACE blocks whose
hints go after main blocks 0 and 2 (inferred from the counts, 4 // 2 = 2, as
the 1.3B's 30 // 15), a 96-channel conditioning latent; seeded random
weights with `after_proj` at its random scale (the official init is zero, under
which a hint would change nothing and no mistake would show). diffusers gets the
same float32 weights through its own `convert_wan_transformer_to_diffusers`.
"""
from __future__ import annotations

import pytest
import torch

from engine.tiny import random_state_dict
from engine.wan.convert.dit import community_qtype, write_dit_gguf
from engine.wan.dit import WAN_CONFIGS, ModelConfigError, WanConfig, WanModel, expected_shapes, infer_config, load_dit

# Velocity (|v| ~ 1-3) of one forward in float32, ours vs diffusers: op order only.
ATOL = 5e-5
# A mistake counts as rejected when it moves the output this far.
REJECT = 100 * ATOL
CFG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, in_dim=16, out_dim=16, text_dim=64,
                vace_layers=(0, 2), vace_in_dim=96)
GRID = (3, 8, 8)  # latent frames, height, width


def dense(state: dict[str, torch.Tensor], cfg: WanConfig = CFG) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_vace(state: dict[str, torch.Tensor], cfg: WanConfig = CFG, vace_layers=None):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanVACETransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, vace_layers=list(vace_layers or cfg.vace_layers),
        vace_in_channels=cfg.vace_in_dim,
    )
    # strict: every VACE tensor (vace_patch_embedding, vace_blocks.K.*, before/after_proj) has its place.
    model.load_state_dict(convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state.items()}), strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        proto = WanModel(CFG)
    return random_state_dict(proto, torch.Generator().manual_seed(7))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, *GRID, generator=g)
    t = torch.tensor([900.0, 900.0])
    context = torch.randn(2, 512, CFG.text_dim, generator=g)
    context[0, 7:], context[1, 12:] = 0, 0  # Wan zero-pads the umT5 output to 512 tokens (diffusers' pipeline does)
    vace = torch.randn(2, 96, *GRID, generator=g)
    return x, t, context, vace


def theirs(model, x, t, context, vace, scale: float = 1.0) -> torch.Tensor:
    scales = torch.full((len(model.config.vace_layers),), scale)
    return model(hidden_states=x, timestep=t, encoder_hidden_states=context, control_hidden_states=vace,
                 control_hidden_states_scale=scales, return_dict=False)[0]


def test_published_vace_sizes_are_inferred_from_their_shapes():
    # The files carry no vace_layers: 1.3B 30 / 15 blocks -> every 2nd, 14B (and VACE-Fun A14B) 40 / 8 -> every 5th.
    assert WAN_CONFIGS["vace-1.3B"].vace_layers == tuple(range(0, 30, 2))
    assert WAN_CONFIGS["vace-14B"].vace_layers == (0, 5, 10, 15, 20, 25, 30, 35)
    for name in ("vace-1.3B", "vace-14B"):
        cfg = WAN_CONFIGS[name]
        assert infer_config(expected_shapes(cfg)) == cfg
    assert infer_config(expected_shapes(CFG), {"wan.attention.head_count": 2}) == CFG


def test_forward_matches_diffusers(state):
    ours, ref = dense(state), diffusers_vace(state)
    x, t, context, vace = inputs()
    with torch.no_grad():
        for scale in (1.0, 0.5):
            got = ours(x, t, context, vace_context=vace, context_scale=scale)
            want = theirs(ref, x, t, context, vace, scale)
            assert (got - want).abs().max() < ATOL, scale


def test_the_oracle_rejects_wrong_hints(state):
    """Each mistake moves the output far outside the tolerance: the hints matter with these weights."""
    ours = dense(state)
    x, t, context, vace = inputs()
    with torch.no_grad():
        got = ours(x, t, context, vace_context=vace)
        # Hints after the wrong main blocks (every block instead of every 2nd).
        shifted = theirs(diffusers_vace(state, vace_layers=[0, 1]), x, t, context, vace)
        assert (got - shifted).abs().max() > REJECT
        # Another conditioning latent, and the hints scaled to nothing.
        assert (got - ours(x, t, context, vace_context=inputs(1)[3])).abs().max() > REJECT
        assert (got - ours(x, t, context, vace_context=vace, context_scale=0.0)).abs().max() > REJECT


def test_context_scale_zero_is_the_model_without_hints(state):
    """Scale 0 adds nothing: the output is the main blocks' alone (checked against a plain Wan model
    holding only the main weights)."""
    plain_cfg = WanConfig(**{**CFG.__dict__, "vace_layers": None, "vace_in_dim": None})
    plain = dense({k: v for k, v in state.items() if not k.startswith("vace_")}, plain_cfg)
    x, t, context, vace = inputs()
    with torch.no_grad():
        got = dense(state)(x, t, context, vace_context=vace, context_scale=0.0)
        assert torch.allclose(got, plain(x, t, context), atol=1e-6)


def test_q8_0_file_has_the_community_layout_and_loads(state, tmp_path):
    """VACE block weights are quantized like the main blocks' (2-D, in a block); the VACE
    patch embedding stays F32. Both weight policies give the dense model's output on its
    dequantized weights."""
    from engine.gguf.reader import GGUFFile
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "Wan2.1_tiny_VACE-Q8_0.gguf"
    write_dit_gguf(state, path, "Q8_0", metadata={"wan.attention.head_count": 2})
    assert community_qtype("vace_blocks.1.after_proj.weight", (256, 256), "Q8_0") == Q.Q8_0
    assert community_qtype("vace_blocks.0.ffn.0.weight", (512, 256), "Q8_0") == Q.Q8_0
    assert community_qtype("vace_patch_embedding.weight", (256, 96, 1, 2, 2), "Q8_0") == Q.F32
    with GGUFFile(path) as f:
        assert f.qtype("vace_blocks.0.before_proj.weight") == Q.Q8_0
    x, t, context, vace = inputs()
    once = load_dit(path, policy="dequantize_once")
    assert once.config == CFG
    fly = load_dit(path, policy="on_the_fly")
    with torch.no_grad():
        dequantized = {k: v.float() for k, v in once.state_dict().items()}
        want = dense(dequantized)(x, t, context, vace_context=vace)
        assert (once(x, t, context, vace_context=vace) - want).abs().max() < 1e-5
        assert (fly(x, t, context, vace_context=vace) - want).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("vace_blocks.1.after_proj.weight"), "'vace_blocks.1.after_proj.weight' is missing"),
    (lambda s: s.pop("vace_blocks.0.before_proj.bias"), "'vace_blocks.0.before_proj.bias' is missing"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("vace_blocks.0.")], "'vace_blocks.0.*' is missing"),
    (lambda s: s.update({"vace_patch_embedding.weight": torch.zeros(128, 96, 1, 2, 2)}),
     "'vace_patch_embedding.weight' has shape [128, 96, 1, 2, 2], expected [256, 96, 1, 2, 2]"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("vace_blocks.")], "0 VACE blocks"),
])
def test_broken_vace_files_are_refused_naming_the_tensor(state, change, message):
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    broken = dict(state)
    change(broken)
    with pytest.raises(ModelConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        infer_config({k: tuple(v.shape) for k, v in broken.items()}, {"wan.attention.head_count": 2})
    assert infer_config(shapes, {"wan.attention.head_count": 2}) == CFG


def test_vace_context_is_required_and_checked(state):
    model = dense(state)
    x, t, context, vace = inputs()
    with pytest.raises(ValueError, match="needs vace_context"):
        model(x, t, context)
    with pytest.raises(ValueError, match=r"vace_context has shape \[2, 96, 2, 8, 8\]"):
        model(x, t, context, vace_context=vace[:, :, :2])
