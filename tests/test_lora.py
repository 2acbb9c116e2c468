"""LoRAs on the Wan DiT (`engine/lora.py`): the published layouts, the side path on plain and
quantized layers, exact restore, errors, the cache, and diffusers' own LoRA loading as the oracle.

Models are tiny (dim 64 = 2 heads of 32, ffn 128, 2 blocks, text_dim 32; VACE: 4 blocks and 2
VACE blocks; Wan2.1 I2V: a 32-wide image branch) with seeded random weights. The reference for
"applied right" is the dense merged model, W + strength x alpha / rank x up @ down (+ the full
deltas), computed here in float32 from the LoRA tensors, independent of engine/lora.py.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.gguf.linear import QuantizedLinear
from engine.lora import LoraCache, LoraError, applied, check_lora, read_lora, read_lora_header
from engine.tiny import QUANTS, random_state_dict
from engine.wan.convert.dit import write_dit_gguf
from engine.wan.dit import WanConfig, WanModel, load_dit
from tests.run_helpers import one_torch_thread

CFG = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32)
VACE = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, in_dim=16, out_dim=16, text_dim=32,
                 vace_layers=(0, 2), vace_in_dim=96)
I2V = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=32, image_dim=32)
HEADS = {"wan.attention.head_count": 2}
RANK = 4

# Float32, outputs (velocity, layer outputs) of size ~1-5: the side path against the dense merged
# weight differs by the order of float32 operations only (measured at most 3.3e-6).
ATOL = 2e-5
# diffusers' forward against ours, with or without LoRA (measured 2.2e-5: op order).
ORACLE_ATOL = 1e-4
# A mistake (wrong strength, wrong layer) counts as rejected when it moves the output this far.
REJECT = 50 * ORACLE_ATOL


# --- models and inputs ----------------------------------------------------------------


def random_state(cfg: WanConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        meta = WanModel(cfg)
    return random_state_dict(meta, torch.Generator().manual_seed(seed))


def dense(cfg: WanConfig, state: dict[str, torch.Tensor]) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def inputs(cfg: WanConfig = CFG, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    args = dict(x=torch.randn(2, cfg.in_dim, 2, 8, 8, generator=gen), t=torch.tensor([900.0, 300.0]),
                context=torch.randn(2, 12, cfg.text_dim, generator=gen))
    if cfg.image_dim is not None:
        args["clip_features"] = torch.randn(2, 257, cfg.image_dim, generator=gen)
    if cfg.vace_layers is not None:
        args["vace_context"] = torch.randn(2, cfg.vace_in_dim, 2, 8, 8, generator=gen)
    return args


@torch.no_grad()
def run(model: WanModel, cfg: WanConfig = CFG, **extra) -> torch.Tensor:
    return model(**inputs(cfg), **extra)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~50x faster than OpenMP's threads on a busy shared machine."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def base_state():
    return random_state(CFG, 1)


@pytest.fixture(scope="module")
def gguf_files(base_state, tmp_path_factory):
    """The base model as a community-layout GGUF in every quant the writer writes."""
    root = tmp_path_factory.mktemp("dit")
    files = {}
    for quant in QUANTS:
        files[quant] = root / f"tiny-{quant}.gguf"
        write_dit_gguf(base_state, files[quant], quant=quant, metadata=HEADS)
    return files


# --- LoRA specs, their layouts, and the dense merged reference ------------------------


def pair(out_features: int, in_features: int, gen: torch.Generator, rank: int = RANK):
    """(down, up) whose product is about the size of a layer's weight (entries ~ 0.5 / sqrt(in))."""
    down = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
    up = 0.5 * torch.randn(out_features, rank, generator=gen) / math.sqrt(rank)
    return down, up


def lowrank_spec(cfg: WanConfig, seed: int, alpha: float | None, bias: bool = True, targets=None) -> dict:
    """target -> {"down", "up", "alpha", "diff_b"} for a spread of linear layers of `cfg`."""
    gen = torch.Generator().manual_seed(seed)
    d, f = cfg.dim, cfg.ffn_dim
    shapes = {"text_embedding.0": (d, cfg.text_dim), "time_embedding.2": (d, d), "time_projection.1": (6 * d, d),
              "head.head": (cfg.out_dim * 4, d)}
    for i in range(cfg.num_layers):
        shapes |= {f"blocks.{i}.self_attn.q": (d, d), f"blocks.{i}.self_attn.o": (d, d),
                   f"blocks.{i}.cross_attn.v": (d, d), f"blocks.{i}.ffn.0": (f, d), f"blocks.{i}.ffn.2": (d, f)}
    if targets is not None:
        shapes = {t: shapes[t] for t in targets}
    spec = {}
    for target, (out_features, in_features) in shapes.items():
        down, up = pair(out_features, in_features, gen)
        spec[target] = {"down": down, "up": up, "alpha": alpha}
        if bias:
            spec[target]["diff_b"] = 0.3 * torch.randn(out_features, generator=gen)
    return spec


def comfy(spec: dict, prefix: str = "diffusion_model.", down="lora_down", up="lora_up") -> dict[str, torch.Tensor]:
    out = {}
    for target, parts in spec.items():
        if "down" in parts:
            out[f"{prefix}{target}.{down}.weight"] = parts["down"]
            out[f"{prefix}{target}.{up}.weight"] = parts["up"]
            if parts.get("alpha") is not None:
                out[f"{prefix}{target}.alpha"] = torch.tensor(float(parts["alpha"]))
        for part in ("diff", "diff_b"):
            if part in parts:
                out[f"{prefix}{target}.{part}"] = parts[part]
    return out


def musubi(spec: dict) -> dict[str, torch.Tensor]:
    """musubi-tuner's names: `lora_unet_` and the module path with underscores for dots."""
    out = {}
    for key, value in comfy(spec, prefix="").items():
        suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff_b", ".diff")
        suffix = next(s for s in suffixes if key.endswith(s))
        out["lora_unet_" + key.removesuffix(suffix).replace(".", "_") + suffix] = value
    return out


def diffusers_name(target: str) -> str:
    """diffusers' name of an original Wan layer, by diffusers' own checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    (name,) = convert_wan_transformer_to_diffusers({f"{target}.weight": torch.zeros(1)})
    return name.removesuffix(".weight")


def diffusers_layout(spec: dict) -> dict[str, torch.Tensor]:
    out = {}
    for target, parts in spec.items():
        name = f"transformer.{diffusers_name(target)}"
        assert parts.get("alpha") is None, "the diffusers layout has no alpha"
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = parts["down"], parts["up"]
        if "diff_b" in parts:
            out[f"{name}.lora_B.bias"] = parts["diff_b"]
    return out


def merged(state: dict[str, torch.Tensor], *loras: tuple[dict, float]) -> dict[str, torch.Tensor]:
    """The state with each spec's deltas added at its strength (the dense reference)."""
    state = {k: v.clone() for k, v in state.items()}
    for spec, strength in loras:
        for target, parts in spec.items():
            weight = target if target.endswith("modulation") else f"{target}.weight"
            if "down" in parts:
                scale = 1.0 if parts.get("alpha") is None else parts["alpha"] / parts["down"].shape[0]
                product = parts["up"].flatten(1) @ parts["down"].flatten(1)
                state[weight] = state[weight] + strength * scale * product.reshape(state[weight].shape)
            if "diff" in parts:
                state[weight] = state[weight] + strength * parts["diff"].reshape(state[weight].shape)
            if "diff_b" in parts:
                state[f"{target}.bias"] = state[f"{target}.bias"] + strength * parts["diff_b"]
    return state


def write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- 1. the side path equals the dense merged weight, every layer kind ---------------


@pytest.mark.parametrize("policy", ["dequantize_once", "on_the_fly"])
@pytest.mark.parametrize("quant", QUANTS)
def test_side_path_equals_the_merged_weight_on_plain_and_quantized_layers(gguf_files, tmp_path, quant, policy):
    model = load_dit(gguf_files[quant], policy=policy)
    layers = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.ffn.2", "text_embedding.0", "head.head"]
    quantized = policy == "on_the_fly" and quant != "F16"  # F16 stays a plain float tensor under both policies
    for name in layers:
        layer = model.get_submodule(name)
        in_block = name.startswith("blocks.")
        assert isinstance(layer, QuantizedLinear if quantized and in_block else torch.nn.Linear), name
    gen = torch.Generator().manual_seed(7)
    spec = {}
    for name in layers:
        layer = model.get_submodule(name)
        down, up = pair(layer.out_features, layer.in_features, gen)
        spec[name] = {"down": down, "up": up, "alpha": 2.0,
                      "diff_b": 0.3 * torch.randn(layer.out_features, generator=gen),
                      "diff": 0.1 * torch.randn(layer.out_features, layer.in_features, generator=gen)}
    lora = read_lora(write(tmp_path / "l.safetensors", comfy(spec)))
    raws = {n: model.get_submodule(n).raw.clone() for n in layers if hasattr(model.get_submodule(n), "raw")}
    strength = 0.8
    for name in layers:
        layer = model.get_submodule(name)
        x = torch.randn(3, 7, layer.in_features, generator=gen)
        weight = layer.dequantized_weight(torch.float32) if isinstance(layer, QuantizedLinear) else layer.weight
        parts = spec[name]
        expected_weight = weight + strength * (parts["alpha"] / RANK * parts["up"] @ parts["down"] + parts["diff"])
        expected = F.linear(x, expected_weight, layer.bias + strength * parts["diff_b"])
        before = layer(x)
        with applied(model, [(lora, strength)]):
            got = model.get_submodule(name)(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert (got - before).abs().max() > 0.1  # the LoRA does something
        assert torch.equal(model.get_submodule(name)(x), before)
    for name, raw in raws.items():  # the GGML blocks are never touched (never re-quantized)
        assert torch.equal(model.get_submodule(name).raw, raw)


def test_side_path_in_bfloat16_stays_close_to_the_float32_merge(gguf_files, tmp_path):
    """bf16 compute: the side path runs in x's dtype; against the float32 merged weight it is off
    by bf16 rounding only (measured ~1e-2 on outputs of size ~1; stated 5e-2)."""
    model = load_dit(gguf_files["Q8_0"], policy="on_the_fly", dtype=torch.bfloat16)
    layer = model.get_submodule("blocks.0.ffn.0")
    gen = torch.Generator().manual_seed(8)
    down, up = pair(layer.out_features, layer.in_features, gen)
    lora = read_lora(write(tmp_path / "l.safetensors", comfy({"blocks.0.ffn.0": {"down": down, "up": up}})))
    x = torch.randn(4, 9, layer.in_features, generator=gen)
    expected = F.linear(x, layer.dequantized_weight(torch.float32) + up @ down, layer.bias.float())
    with applied(model, [(lora, 1.0)]):
        got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=5e-2, rtol=2e-2)


# --- 2. every layout gives the same model as the comfy layout ------------------------


def test_lowrank_layouts_give_the_same_model(base_state, tmp_path):
    """comfy (alpha = rank), PEFT lora_A/B (no alpha), musubi, diffusers: bitwise the same model,
    and that model is the dense merged one."""
    spec = lowrank_spec(CFG, 11, alpha=float(RANK))
    model = dense(CFG, base_state)
    expected = run(dense(CFG, merged(base_state, (spec, 1.0))))
    no_alpha = {t: {**p, "alpha": None} for t, p in spec.items()}
    files = {
        "comfy": comfy(spec),
        "comfy, model.diffusion_model.": comfy(spec, prefix="model.diffusion_model."),
        "peft": comfy(no_alpha, down="lora_A", up="lora_B"),
        "musubi": musubi(spec),
        "diffusers": diffusers_layout(no_alpha),
    }
    outputs = {}
    for layout, tensors in files.items():
        lora = read_lora(write(tmp_path / f"{layout}.safetensors", tensors))
        assert set(lora.targets) == set(spec) or layout == "musubi", layout
        with applied(model, [(lora, 1.0)]):
            outputs[layout] = run(model)
    assert read_lora(tmp_path / "musubi.safetensors").layout == "musubi"
    assert read_lora(tmp_path / "diffusers.safetensors").layout == "diffusers"
    torch.testing.assert_close(outputs["comfy"], expected, atol=ATOL, rtol=0)
    assert (outputs["comfy"] - run(model)).abs().max() > 0.5
    for layout, output in outputs.items():
        assert torch.equal(output, outputs["comfy"]), layout


def test_alpha_and_strength_scale_a_pair(base_state, tmp_path):
    """strength x alpha / rank (alpha 2, rank 4, strength 0.7), and strength alone without alpha."""
    model = dense(CFG, base_state)
    spec = lowrank_spec(CFG, 12, alpha=2.0)
    lora = read_lora(write(tmp_path / "a.safetensors", comfy(spec)))
    with applied(model, [(lora, 0.7)]):
        got = run(model)
    torch.testing.assert_close(got, run(dense(CFG, merged(base_state, (spec, 0.7)))), atol=ATOL, rtol=0)
    no_alpha = {t: {**p, "alpha": None} for t, p in spec.items()}
    lora = read_lora(write(tmp_path / "b.safetensors", comfy(no_alpha)))
    with applied(model, [(lora, 0.7)]):
        got = run(model)
    torch.testing.assert_close(got, run(dense(CFG, merged(base_state, (no_alpha, 0.7)))), atol=ATOL, rtol=0)


def diff_spec(cfg: WanConfig, seed: int) -> dict:
    """Full deltas as extracted LoRAs hold them: linear weights and biases, the modulation tables,
    norm weights (RMSNorm norm_q, the affine norm3) and the patch embedding."""
    gen = torch.Generator().manual_seed(seed)
    d = cfg.dim
    spec = {
        "blocks.0.self_attn.k": {"diff": 0.2 * torch.randn(d, d, generator=gen) / math.sqrt(d),
                                 "diff_b": 0.2 * torch.randn(d, generator=gen)},
        "blocks.1.ffn.2": {"diff": 0.5 * torch.randn(d, cfg.ffn_dim, generator=gen) / math.sqrt(cfg.ffn_dim)},
        "blocks.0.self_attn.norm_q": {"diff": 0.2 * torch.randn(d, generator=gen)},
        "blocks.1.norm3": {"diff": 0.2 * torch.randn(d, generator=gen), "diff_b": 0.2 * torch.randn(d, generator=gen)},
        "patch_embedding": {"diff": 0.1 * torch.randn(d, cfg.in_dim, 1, 2, 2, generator=gen),
                            "diff_b": 0.1 * torch.randn(d, generator=gen)},
        "head.head": {"diff_b": 0.2 * torch.randn(cfg.out_dim * 4, generator=gen)},
    }
    for i in range(cfg.num_layers):
        spec[f"blocks.{i}.modulation"] = {"diff": 0.3 * torch.randn(1, 6, d, generator=gen)}
    spec["head.modulation"] = {"diff": 0.3 * torch.randn(1, 2, d, generator=gen)}
    return spec


def diff_m_layout(spec: dict) -> dict[str, torch.Tensor]:
    """LightX2V's names: `blocks.N.diff_m` / `head.diff_m` for the modulation tables."""
    out = {}
    for key, value in comfy(spec).items():
        if key.endswith(".modulation.diff"):
            key = key.removesuffix(".modulation.diff") + ".diff_m"
        out[key] = value
    return out


def test_full_deltas_diff_diff_b_diff_m_and_norms(base_state, tmp_path):
    spec = diff_spec(CFG, 13)
    model = dense(CFG, base_state)
    with_diff_m = read_lora(write(tmp_path / "m.safetensors", diff_m_layout(spec)))
    assert "diffusion_model.blocks.0.diff_m" in set(k for t in with_diff_m.targets.values() for k in t.keys)
    assert "blocks.0.modulation" in with_diff_m.targets and "head.modulation" in with_diff_m.targets
    generic = read_lora(write(tmp_path / "g.safetensors", comfy(spec)))  # ComfyUI's `blocks.N.modulation.diff`
    with applied(model, [(with_diff_m, 0.6)]):
        got = run(model)
    with applied(model, [(generic, 0.6)]):
        assert torch.equal(run(model), got)
    torch.testing.assert_close(got, run(dense(CFG, merged(base_state, (spec, 0.6)))), atol=ATOL, rtol=0)
    # Each kind of delta counts: leaving any one out moves the output.
    for target in spec:
        partial = {t: p for t, p in spec.items() if t != target}
        without = run(dense(CFG, merged(base_state, (partial, 0.6))))
        assert (without - got).abs().max() > 10 * ATOL, target


def test_a_lone_head_head_diff_is_a_full_delta(base_state, tmp_path):
    """Some Wan2.2 distill LoRAs hold only `head.head.diff`: the same model as that delta given
    as a full-rank comfy pair (down = delta, up = identity)."""
    gen = torch.Generator().manual_seed(14)
    delta = 0.3 * torch.randn(CFG.out_dim * 4, CFG.dim, generator=gen) / math.sqrt(CFG.dim)
    lone = read_lora(write(tmp_path / "lone.safetensors", {"diffusion_model.head.head.diff": delta}))
    assert list(lone.targets) == ["head.head"] and lone.layout == "diff"
    as_pair = read_lora(write(tmp_path / "pair.safetensors", comfy(
        {"head.head": {"down": delta, "up": torch.eye(CFG.out_dim * 4)}})))
    model = dense(CFG, base_state)
    with applied(model, [(lone, 1.0)]):
        got = run(model)
    with applied(model, [(as_pair, 1.0)]):
        torch.testing.assert_close(run(model), got, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, run(dense(CFG, merged(base_state, ({"head.head": {"diff": delta}}, 1.0)))),
                               atol=ATOL, rtol=0)
    assert (got - run(model)).abs().max() > 0.1


def test_several_loras_add_up_in_order(base_state, tmp_path):
    """Two LoRAs on overlapping layers (pairs and full deltas) add up: the dense model with both."""
    first = lowrank_spec(CFG, 15, alpha=2.0)
    second = lowrank_spec(CFG, 16, alpha=None, targets=["blocks.0.self_attn.q", "blocks.1.ffn.0", "head.head"])
    third = diff_spec(CFG, 17)
    files = [read_lora(write(tmp_path / f"{i}.safetensors", comfy(s))) for i, s in enumerate((first, second, third))]
    model = dense(CFG, base_state)
    with applied(model, list(zip(files, (1.0, -0.5, 0.8)))):
        got = run(model)
    expected = run(dense(CFG, merged(base_state, (first, 1.0), (second, -0.5), (third, 0.8))))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def vace_spec(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    d = VACE.dim
    spec = {}
    for target in ("vace_blocks.0.before_proj", "vace_blocks.0.after_proj", "vace_blocks.1.after_proj",
                   "vace_blocks.1.self_attn.q", "vace_blocks.0.cross_attn.o", "blocks.3.ffn.2"):
        out_features, in_features = (d, VACE.ffn_dim) if target.endswith("ffn.2") else (d, d)
        down, up = pair(out_features, in_features, gen)
        spec[target] = {"down": down, "up": up, "diff_b": 0.2 * torch.randn(out_features, generator=gen)}
    return spec


def test_vace_blocks_in_comfy_and_diffusers_names(tmp_path):
    state = random_state(VACE, 21)
    spec = vace_spec(22)
    full = {**spec, "vace_patch_embedding": {"diff": 0.1 * torch.randn(VACE.dim, 96, 1, 2, 2),
                                             "diff_b": 0.1 * torch.randn(VACE.dim)},
            "vace_blocks.1.modulation": {"diff": 0.3 * torch.randn(1, 6, VACE.dim)}}
    model = dense(VACE, state)
    lora = read_lora(write(tmp_path / "vace.safetensors", comfy(full)))
    with applied(model, [(lora, 1.0)]):
        got = run(model, VACE)
    torch.testing.assert_close(got, run(dense(VACE, merged(state, (full, 1.0))), VACE), atol=ATOL, rtol=0)
    assert (got - run(model, VACE)).abs().max() > 0.1
    # diffusers calls before_proj / after_proj proj_in / proj_out.
    names = diffusers_layout(spec)
    assert "transformer.vace_blocks.0.proj_in.lora_A.weight" in names
    lora = read_lora(write(tmp_path / "vace-diffusers.safetensors", names))
    with applied(model, [(lora, 1.0)]):
        got = run(model, VACE)
    torch.testing.assert_close(got, run(dense(VACE, merged(state, (spec, 1.0))), VACE), atol=ATOL, rtol=0)


def test_i2v_image_branch_layers(tmp_path):
    """Wan2.1 I2V: k_img / v_img, img_emb.proj.1 / .3 (pairs, and diffusers' names for them), the
    image embedding's LayerNorms and norm_k_img (full deltas)."""
    state = random_state(I2V, 31)
    gen = torch.Generator().manual_seed(32)
    d, c = I2V.dim, I2V.image_dim
    spec = {}
    shapes = {"blocks.0.cross_attn.k_img": (d, d), "blocks.1.cross_attn.v_img": (d, d),
              "img_emb.proj.1": (c, c), "img_emb.proj.3": (d, c)}
    for target, (out_features, in_features) in shapes.items():
        down, up = pair(out_features, in_features, gen)
        spec[target] = {"down": down, "up": up, "diff_b": 0.2 * torch.randn(out_features, generator=gen)}
    norms = {"img_emb.proj.0": {"diff": 0.2 * torch.randn(c, generator=gen),
                                "diff_b": 0.2 * torch.randn(c, generator=gen)},
             "img_emb.proj.4": {"diff": 0.2 * torch.randn(d, generator=gen)},
             "blocks.0.cross_attn.norm_k_img": {"diff": 0.2 * torch.randn(d, generator=gen)}}
    model = dense(I2V, state)
    base = run(model, I2V)
    for name, tensors, expected_spec in (("comfy", comfy({**spec, **norms}), {**spec, **norms}),
                                         ("diffusers", diffusers_layout(spec), spec)):
        lora = read_lora(write(tmp_path / f"{name}.safetensors", tensors))
        with applied(model, [(lora, 1.0)]):
            got = run(model, I2V)
        torch.testing.assert_close(got, run(dense(I2V, merged(state, (expected_spec, 1.0))), I2V), atol=ATOL, rtol=0)
        assert (got - base).abs().max() > 0.1, name
    assert torch.equal(run(model, I2V), base)


# --- 3. exact restore ----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["dequantize_once", "on_the_fly"])
def test_exit_restores_the_model_bit_for_bit(gguf_files, tmp_path, policy):
    model = load_dit(gguf_files["Q4_0"], policy=policy)
    before_state = state_of(model)
    before_params = dict(model.named_parameters())
    before_raw = {n: b.clone() for n, b in model.named_buffers()}
    before = run(model)
    lora = read_lora(write(tmp_path / "x.safetensors", {**comfy(lowrank_spec(CFG, 41, alpha=2.0)),
                                                         **diff_m_layout(diff_spec(CFG, 42))}))
    with applied(model, [(lora, 1.0)]):
        during = run(model)
        assert model.blocks[0].modulation is not before_params["blocks.0.modulation"]
    assert (during - before).abs().max() > 0.5
    after_state = state_of(model)
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert all(p is before_params[n] for n, p in model.named_parameters())  # the original objects
    assert all(torch.equal(b, before_raw[n]) for n, b in model.named_buffers())
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(run(model), before)


def test_a_failing_job_still_restores(base_state, tmp_path):
    model = dense(CFG, base_state)
    before = run(model)
    lora = read_lora(write(tmp_path / "x.safetensors", comfy({**lowrank_spec(CFG, 43, 2.0), **diff_spec(CFG, 44)})))
    with pytest.raises(RuntimeError, match="render failed"):
        with applied(model, [(lora, 1.0)]):
            raise RuntimeError("render failed")
    assert torch.equal(run(model), before)


def test_a_job_after_another_lora_equals_a_fresh_model(gguf_files, tmp_path):
    """Job with LoRA X after a job with LoRA Y: the same bits as X on a freshly loaded model."""
    path = gguf_files["Q5_1"]
    x = read_lora(write(tmp_path / "x.safetensors", {**comfy(lowrank_spec(CFG, 51, 2.0)),
                                                      **diff_m_layout(diff_spec(CFG, 52))}))
    y = read_lora(write(tmp_path / "y.safetensors", {**comfy(lowrank_spec(CFG, 53, None)),
                                                      **diff_m_layout(diff_spec(CFG, 54))}))
    used = load_dit(path, policy="on_the_fly")
    with applied(used, [(y, 1.3)]):
        run(used)
    with applied(used, [(x, 0.9)]):
        after_y = run(used)
    fresh = load_dit(path, policy="on_the_fly")
    with applied(fresh, [(x, 0.9)]):
        assert torch.equal(run(fresh), after_y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_moved_between_devices_while_applied_is_restored_where_it_is(gguf_files, tmp_path):
    """An expert swapped out mid-job: the side path follows it (a copy per device) and the original
    parameters come back on the device the model is on now."""
    model = load_dit(gguf_files["Q8_0"], policy="on_the_fly")
    before = run(model)
    lora = read_lora(write(tmp_path / "x.safetensors", {**comfy(lowrank_spec(CFG, 61, 2.0)),
                                                         **diff_m_layout(diff_spec(CFG, 62))}))
    with applied(model, [(lora, 1.0)]):
        on_cpu = run(model)
        model.to("cuda")
        args = {k: v.cuda() for k, v in inputs().items()}
        with torch.no_grad():
            on_gpu = model(**args).cpu()
    # cuDNN may run the patch embedding in TF32: close, not equal; the LoRA's effect is ~1.
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-2, rtol=1e-2)
    assert (on_gpu - before).abs().max() > 0.5
    assert all(p.device.type == "cuda" for p in model.parameters())
    model.to("cpu")
    assert torch.equal(run(model), before)


# --- 4. diffusers' LoRA loading as the oracle ----------------------------------------


def diffusers_transformer(cfg: WanConfig, state: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    image = {} if cfg.image_dim is None else dict(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, **image,
    )
    ref.load_state_dict(convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state.items()}), strict=True)
    return ref.eval().requires_grad_(False)


@torch.no_grad()
def run_diffusers(ref, cfg: WanConfig = CFG) -> torch.Tensor:
    args = inputs(cfg)
    context = F.pad(args["context"], (0, 0, 0, cfg.text_len - args["context"].shape[1]))  # Wan pads to 512
    return ref(hidden_states=args["x"], timestep=args["t"], encoder_hidden_states=context,
               encoder_hidden_states_image=args.get("clip_features"), return_dict=False)[0]


def pipeline(transformer, transformer_2=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=None if transformer_2 is None else 0.875)


def oracle_spec(cfg: WanConfig, seed: int) -> dict:
    """What diffusers' converter takes from a ComfyUI file: pairs with alpha on block layers and a
    diff_b on each (it gives every LoRA layer a bias when one has it), and the lone head.head.diff
    with its diff_b (LightX2V's layout; diffusers makes it a pair with an identity up)."""
    gen = torch.Generator().manual_seed(seed)
    spec = lowrank_spec(cfg, seed, alpha=2.0, targets=[
        f"blocks.{i}.{layer}" for i in range(cfg.num_layers)
        for layer in ("self_attn.q", "self_attn.o", "cross_attn.v", "ffn.0", "ffn.2")])
    spec["head.head"] = {"diff": 0.3 * torch.randn(cfg.out_dim * 4, cfg.dim, generator=gen) / math.sqrt(cfg.dim),
                         "diff_b": 0.2 * torch.randn(cfg.out_dim * 4, generator=gen)}
    return spec


def test_diffusers_oracle_comfy_file_and_strength(base_state, tmp_path):
    ref = diffusers_transformer(CFG, base_state)
    model = dense(CFG, base_state)
    torch.testing.assert_close(run(model), run_diffusers(ref), atol=ORACLE_ATOL, rtol=0)
    spec = oracle_spec(CFG, 71)
    path = write(tmp_path / "comfy.safetensors", comfy(spec))
    pipe = pipeline(ref)
    pipe.load_lora_weights(str(path), adapter_name="x")
    theirs = run_diffusers(ref)
    lora = read_lora(path)
    with applied(model, [(lora, 1.0)]):
        ours = run(model)
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)
    assert (theirs - run(model)).abs().max() > REJECT  # the LoRA matters
    # Another strength: diffusers' adapter weight.
    pipe.set_adapters(["x"], adapter_weights=[0.4])
    theirs_04 = run_diffusers(ref)
    with applied(model, [(lora, 0.4)]):
        torch.testing.assert_close(run(model), theirs_04, atol=ORACLE_ATOL, rtol=0)
    # The oracle rejects the wrong strength and the wrong layer.
    with applied(model, [(lora, 0.5)]):
        assert (run(model) - theirs_04).abs().max() > REJECT
    swapped = {**spec, "blocks.0.ffn.0": spec["blocks.1.ffn.0"], "blocks.1.ffn.0": spec["blocks.0.ffn.0"]}
    wrong = read_lora(write(tmp_path / "wrong.safetensors", comfy(swapped)))
    with applied(model, [(wrong, 1.0)]):
        assert (run(model) - theirs).abs().max() > REJECT


def test_diffusers_oracle_diffusers_file_with_lora_alpha_metadata(base_state, tmp_path):
    """A file saved by diffusers' own `save_lora_weights`, with lora_alpha 8 for rank 4 in its
    `lora_adapter_metadata`: diffusers (peft) scales each pair by 2, its lora_B.bias included,
    and so do we."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    spec = lowrank_spec(CFG, 72, alpha=None)
    layers = {k.removeprefix("transformer."): v for k, v in diffusers_layout(spec).items()}
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_bias=True,
                        target_modules=sorted({k.split(".lora_")[0] for k in layers})).to_dict()
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config,
                                  weight_name="d.safetensors")
    path = tmp_path / "d.safetensors"
    ref = diffusers_transformer(CFG, base_state)
    pipeline(ref).load_lora_weights(str(path), adapter_name="d")
    theirs = run_diffusers(ref)
    lora = read_lora(path)
    assert lora.layout == "diffusers" and lora.targets["head.head"].scale == 2.0
    model = dense(CFG, base_state)
    with applied(model, [(lora, 1.0)]):
        ours = run(model)
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)
    doubled = {t: {**p, "alpha": 2.0 * RANK, "diff_b": 2.0 * p["diff_b"]} for t, p in spec.items()}
    torch.testing.assert_close(ours, run(dense(CFG, merged(base_state, (doubled, 1.0)))), atol=ATOL, rtol=0)
    # Read without its metadata (scale 1), the same tensors are rejected by the oracle.
    plain = read_lora(write(tmp_path / "plain.safetensors", diffusers_layout(spec)))
    with applied(model, [(plain, 1.0)]):
        assert (run(model) - theirs).abs().max() > REJECT


def test_diffusers_oracle_into_transformer_2(base_state, tmp_path):
    """A Wan2.2 expert pair: `load_into_transformer_2=True` puts the LoRA on the low-noise expert
    only; our low-noise model with the LoRA matches it, the high-noise one is untouched."""
    low_state = random_state(CFG, 2)
    high, low = diffusers_transformer(CFG, base_state), diffusers_transformer(CFG, low_state)
    high_before = run_diffusers(high)
    path = write(tmp_path / "low.safetensors", comfy(oracle_spec(CFG, 73)))
    pipeline(high, low).load_lora_weights(str(path), adapter_name="low", load_into_transformer_2=True)
    assert torch.equal(run_diffusers(high), high_before)
    theirs = run_diffusers(low)
    ours_low, ours_high = dense(CFG, low_state), dense(CFG, base_state)
    with applied(ours_low, [(read_lora(path), 1.0)]):
        torch.testing.assert_close(run(ours_low), theirs, atol=ORACLE_ATOL, rtol=0)
    assert (run(ours_low) - theirs).abs().max() > REJECT
    torch.testing.assert_close(run(ours_high), high_before, atol=ORACLE_ATOL, rtol=0)


def test_diffusers_oracle_i2v_image_branch(tmp_path):
    """Wan2.1 I2V: diffusers' converter maps k_img / v_img (add_k_proj / add_v_proj) and
    img_emb.proj.1 / .3 (the image embedder) from a ComfyUI file, as we do."""
    state = random_state(I2V, 81)
    spec = oracle_spec(I2V, 82)
    gen = torch.Generator().manual_seed(83)
    d, c = I2V.dim, I2V.image_dim
    for i in range(I2V.num_layers):
        for proj in ("k_img", "v_img"):
            down, up = pair(d, d, gen)
            spec[f"blocks.{i}.cross_attn.{proj}"] = {"down": down, "up": up, "alpha": 2.0,
                                                     "diff_b": 0.2 * torch.randn(d, generator=gen)}
    for target, (out_features, in_features) in {"img_emb.proj.1": (c, c), "img_emb.proj.3": (d, c)}.items():
        down, up = pair(out_features, in_features, gen)
        spec[target] = {"down": down, "up": up, "diff_b": 0.2 * torch.randn(out_features, generator=gen)}
    path = write(tmp_path / "i2v.safetensors", comfy(spec))
    ref = diffusers_transformer(I2V, state)
    pipeline(ref).load_lora_weights(str(path), adapter_name="i2v")
    theirs = run_diffusers(ref, I2V)
    model = dense(I2V, state)
    with applied(model, [(read_lora(path), 1.0)]):
        ours = run(model, I2V)
    torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)
    without_image = {t: p for t, p in spec.items() if "img" not in t}
    partial = read_lora(write(tmp_path / "partial.safetensors", comfy(without_image)))
    with applied(model, [(partial, 1.0)]):
        assert (run(model, I2V) - theirs).abs().max() > REJECT


# --- 5. errors -----------------------------------------------------------------------


def test_keys_that_match_no_layer_are_counted_and_named(base_state, tmp_path):
    spec = lowrank_spec(CFG, 91, alpha=2.0, targets=["blocks.0.self_attn.q"])
    bad = {**comfy(spec), **comfy({"blocks.99.self_attn.q": spec["blocks.0.self_attn.q"]}, prefix="")}
    lora = read_lora(write(tmp_path / "x.safetensors", bad))
    model = dense(CFG, base_state)
    before = state_of(model)
    with pytest.raises(LoraError) as err:
        with applied(model, [(lora, 1.0)]):
            pytest.fail("must not get here")
    message = str(err.value)
    assert message.endswith("x.safetensors: 4 keys match no layer of this model, "
                            "e.g. 'blocks.99.self_attn.q.lora_down.weight'")
    assert "\n" not in message
    with pytest.raises(LoraError) as from_header:  # the driver's check: the header on a meta-device model
        check_lora(meta_model(CFG), read_lora_header(tmp_path / "x.safetensors"))
    assert str(from_header.value) == message
    assert all(torch.equal(v, before[k]) for k, v in state_of(model).items())
    assert all(not m._forward_hooks for m in model.modules())
    # A VACE-only or I2V-only layer on a T2V model, a musubi name that is no layer, a norm without weights.
    for tensors in ({"diffusion_model.vace_blocks.0.after_proj.diff_b": torch.zeros(CFG.dim)},
                    {"diffusion_model.blocks.0.cross_attn.k_img.diff_b": torch.zeros(CFG.dim)},
                    {"lora_unet_blocks_0_self_attn_z.lora_down.weight": torch.zeros(RANK, CFG.dim),
                     "lora_unet_blocks_0_self_attn_z.lora_up.weight": torch.zeros(CFG.dim, RANK)},
                    {"diffusion_model.blocks.0.norm1.diff": torch.zeros(CFG.dim)}):
        lora = read_lora(write(tmp_path / "y.safetensors", tensors))
        with pytest.raises(LoraError, match=r"y\.safetensors: (1 key matches|2 keys match) no layer"):
            with applied(model, [(lora, 1.0)]):
                pass


def test_a_shape_that_does_not_fit_names_the_key_and_both_shapes(base_state, tmp_path):
    model = dense(CFG, base_state)
    cases = {
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": ({"blocks.0.ffn.0": {"down": torch.zeros(RANK, 65),
                                                                              "up": torch.zeros(128, RANK)}},
                                                            r"\[4, 65\], but 'blocks\.0\.ffn\.0' takes \[4, 64\]"),
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": ({"blocks.0.ffn.0": {"down": torch.zeros(RANK, 64),
                                                                            "up": torch.zeros(64, RANK)}},
                                                          r"\[64, 4\], but 'blocks\.0\.ffn\.0' takes \[128, 4\]"),
        "diffusion_model.blocks.1.diff_m": ({"blocks.1.modulation": {"diff": torch.zeros(1, 2, 64)}},
                                            r"\[1, 2, 64\], but 'blocks\.1\.modulation' takes \[1, 6, 64\]"),
        "diffusion_model.head.head.diff_b": ({"head.head": {"diff_b": torch.zeros(16)}},
                                             r"\[16\], but 'head\.head' takes \[64\]"),
    }
    for key, (spec, shapes) in cases.items():
        tensors = diff_m_layout(spec)
        lora = read_lora(write(tmp_path / "s.safetensors", tensors))
        with pytest.raises(LoraError, match=rf"s\.safetensors: '{re.escape(key)}' has shape {shapes}"):
            with applied(model, [(lora, 1.0)]):
                pass
        with pytest.raises(LoraError, match=rf"s\.safetensors: '{re.escape(key)}' has shape {shapes}"):
            check_lora(meta_model(CFG), read_lora_header(tmp_path / "s.safetensors"))


def test_unreadable_or_incomplete_files_are_refused_in_one_line(tmp_path):
    down, up = torch.zeros(RANK, 64), torch.zeros(64, RANK)
    cases = {
        "half.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down},
                             r"'diffusion_model\.blocks\.0\.self_attn\.q\.lora_down\.weight' has no matching "
                             r"'diffusion_model\.blocks\.0\.self_attn\.q\.lora_up\.weight'"),
        "upper.safetensors": ({"blocks.0.self_attn.q.lora_B.weight": up},
                              r"'blocks\.0\.self_attn\.q\.lora_B\.weight' has no matching "
                              r"'blocks\.0\.self_attn\.q\.lora_A\.weight'"),
        "rank.safetensors": ({"blocks.0.self_attn.q.lora_down.weight": down,
                              "blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK + 1)},
                             r"rank mismatch for 'blocks\.0\.self_attn\.q'"),
        "alpha.safetensors": ({"blocks.0.self_attn.q.alpha": torch.tensor(4.0)},
                              r"'blocks\.0\.self_attn\.q\.alpha' has no lora_down/lora_up pair"),
        "empty.safetensors": ({"text_model.weight": torch.zeros(3)},
                              r"no LoRA keys \(1 tensors, e\.g\. 'text_model\.weight'\)"),
        "dora.safetensors": ({"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up,
                              "blocks.0.self_attn.q.dora_scale": torch.ones(64, 1)},
                             r"1 key is not LoRA tensors this reader knows .* "
                             r"e\.g\. 'blocks\.0\.self_attn\.q\.dora_scale'"),
        "twice.safetensors": ({"diffusion_model.head.head.diff_b": torch.zeros(64), "head.head.diff_b": torch.zeros(64)},
                              r"'head\.head\.diff_b' and 'diffusion_model\.head\.head\.diff_b' "
                              r"both give the diff_b of 'head\.head'"),
    }
    for reader in (read_lora, read_lora_header):  # the header alone shows each of these
        for name, (tensors, message) in cases.items():
            with pytest.raises(LoraError, match=rf"^{re.escape(str(tmp_path / name))}: {message}") as err:
                reader(write(tmp_path / name, tensors))
            assert "\n" not in str(err.value)
        (tmp_path / "lora.ckpt").write_bytes(b"PK\x03\x04 a pickled torch file")
        with pytest.raises(LoraError, match=r"lora\.ckpt: not a safetensors file \(.+\)$"):
            reader(tmp_path / "lora.ckpt")
        with pytest.raises(LoraError, match=r"missing\.safetensors: no such file"):
            reader(tmp_path / "missing.safetensors")
        with pytest.raises(LoraError, match=r"nothing\.safetensors: no LoRA keys \(the file holds no tensors\)"):
            reader(write(tmp_path / "nothing.safetensors", {}))
    # A header whose offsets run past the end of the file (a truncated download).
    whole = write(tmp_path / "whole.safetensors", comfy(lowrank_spec(CFG, 93, 2.0, targets=["head.head"])))
    (tmp_path / "cut.safetensors").write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(LoraError, match=r"cut\.safetensors: not a safetensors file \('diffusion_model\.head\.head\."
                                        r"lora_(down|up)\.weight': its data_offsets do not hold \[\d+, \d+\] F32 values "
                                        r"inside the file\)$"):
        read_lora_header(tmp_path / "cut.safetensors")


def meta_model(cfg: WanConfig) -> WanModel:
    with torch.device("meta"):
        return WanModel(cfg)


def test_the_header_reader_sees_what_the_full_reader_sees(base_state, tmp_path):
    """read_lora_header (the driver's check, no weights read) gives the targets, key names, shapes,
    dtypes, alphas and layout read_lora gives, for every layout, the full deltas and diffusers'
    lora_alpha metadata; the files fit a meta-device model of their config, and a model of another
    width refuses them."""
    spec = lowrank_spec(CFG, 94, alpha=2.0)
    no_alpha = {t: {**p, "alpha": None} for t, p in spec.items()}
    files = {"comfy": (comfy(spec), None), "peft": (comfy(no_alpha, down="lora_A", up="lora_B"), None),
             "musubi": (musubi(spec), None), "diff_m": (diff_m_layout(diff_spec(CFG, 95)), None),
             "diffusers": (diffusers_layout(no_alpha),
                           {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 8, "lora_bias": true}'}),
             "half": ({k: v.half() for k, v in comfy(spec).items()}, None)}
    wider = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32)
    for name, (tensors, metadata) in files.items():
        path = write(tmp_path / f"{name}.safetensors", tensors, metadata)
        full, header = read_lora(path), read_lora_header(path)
        assert header.layout == full.layout and list(header.targets) == list(full.targets), name
        for target, parts in full.targets.items():
            seen = header.targets[target]
            assert seen.keys == parts.keys and seen.alpha == parts.alpha and seen.scale == parts.scale, target
            for part in ("down", "up", "diff", "diff_b"):
                a, b = getattr(parts, part), getattr(seen, part)
                assert (a is None) == (b is None), (name, target, part)
                if a is not None:
                    assert b.device.type == "meta" and (b.shape, b.dtype) == (a.shape, a.dtype), (name, target, part)
        assert header.sha256 == "" and header.nbytes == full.nbytes
        check_lora(meta_model(CFG), header)
        with pytest.raises(LoraError, match=rf"{name}\.safetensors: .* has shape .*, but .* takes "):
            check_lora(meta_model(wider), header)


def test_uri_and_fs_open(tmp_path):
    path = write(tmp_path / "u.safetensors", comfy(lowrank_spec(CFG, 92, 2.0, targets=["head.head"])))
    by_uri = read_lora(f"file://{path}")
    opened = []

    def fs_open(name):
        opened.append(name)
        return open(name, "rb")

    by_open = read_lora(str(path), fs_open=fs_open)
    assert opened == [str(path)]
    assert by_uri.sha256 == by_open.sha256 == read_lora(path).sha256
    assert torch.equal(by_uri.targets["head.head"].down, by_open.targets["head.head"].down)


# --- 6. the cache --------------------------------------------------------------------


def test_cache_reads_a_digest_once_and_evicts_the_least_recent(tmp_path, monkeypatch):
    import engine.lora as lora_module

    files = [write(tmp_path / f"{i}.safetensors", comfy(lowrank_spec(CFG, 100 + i, 2.0, targets=["head.head"])))
             for i in range(3)]
    real = lora_module.read_lora
    reads = []
    monkeypatch.setattr(lora_module, "read_lora", lambda path: reads.append(str(path)) or real(path))
    one = real(files[0])
    cache = LoraCache(max_bytes=2 * one.nbytes)  # room for two
    digests = [real(f).sha256 for f in files]
    first = cache.get(str(files[0]), digests[0])
    assert cache.get(str(files[0]), digests[0]) is first and len(reads) == 1
    # The same bytes under another name: the same entry, not read again.
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(files[0].read_bytes())
    assert cache.get(str(copy), digests[0]) is first and len(reads) == 1
    cache.get(str(files[1]), digests[1])
    cache.get(str(files[0]), digests[0])  # 0 is now the most recent
    cache.get(str(files[2]), digests[2])  # evicts 1
    assert len(reads) == 3 and cache.bytes <= cache.max_bytes
    assert digests[0] in cache and digests[2] in cache and digests[1] not in cache
    cache.get(str(files[1]), digests[1])
    assert len(reads) == 4
    # By path when no digest is given; a digest that is not the file's is refused.
    assert cache.get(str(files[2])) is cache.get(str(files[2]))
    with pytest.raises(LoraError, match="1.safetensors: its bytes have sha256"):
        cache.get(str(files[1]), digests[2][::-1])
    # A file larger than the whole cache is read each time, never kept.
    tiny = LoraCache(max_bytes=one.nbytes - 1)
    tiny.get(str(files[0]), digests[0])
    assert len(tiny) == 0 and tiny.bytes == 0

