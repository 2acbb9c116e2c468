"""The embedded tiny models: a tiny model set per family, in the real file layouts.

No weights can be downloaded where reelray is built and tested, so the demo,
the tests and the benchmarks render with tiny random models written here
from a fixed seed: DiT GGUFs with the original Wan names and quantized block
weights (as city96 / QuantStack publish them; the A14B experts as a
`HighNoise/...-HighNoise-<quant>.gguf` and `LowNoise/...-LowNoise-<quant>.gguf`
pair), a umT5 GGUF with llama.cpp names and a SentencePiece tokenizer in its
metadata, a Wan2.1 or Wan2.2 VAE safetensors with the original names, and
for Wan2.1 I2V a CLIP vision encoder in `clip_vision_h.safetensors`'s layout;
the VACE DiTs have VACE blocks.
Running it twice writes byte-identical files; the Wan2.1 T2V set is the
embedded default.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.model_set import DEFAULTS_KEY

SEED = 20250225  # Wan2.1's release date: any fixed number would do.

TINY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)
TINY_T5 = dict(dim=64, heads=4, head_dim=16, ffn_dim=128, num_layers=2)
# Small enough to render in a fraction of a second on one CPU core.
TINY_DEFAULTS = dict(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=5.0, fps=16, sampler="unipc")
FAMILY_DEFAULTS = {
    "wan2.1-t2v": TINY_DEFAULTS,
    "wan2.1-i2v": TINY_DEFAULTS | dict(shift=3.0),  # the 480P file's shift
    "wan2.2-t2v-a14b": TINY_DEFAULTS | dict(guidance=4.0, guidance_2=3.0, shift=12.0, boundary=0.875),
    "wan2.2-i2v-a14b": TINY_DEFAULTS | dict(guidance=3.5, guidance_2=3.5, boundary=0.9),
    "wan2.2-ti2v-5b": TINY_DEFAULTS | dict(fps=24),
    "wan2.1-vace": TINY_DEFAULTS | dict(shift=16.0, context_scale=1.0),
    "wan2.2-vace-fun-a14b": TINY_DEFAULTS | dict(shift=16.0, context_scale=1.0, guidance_2=5.0, boundary=0.875),
}
DIT_CHANNELS = {"wan2.1-t2v": (16, 16), "wan2.1-i2v": (36, 16), "wan2.2-t2v-a14b": (16, 16), "wan2.2-i2v-a14b": (36, 16),
                "wan2.2-ti2v-5b": (48, 48), "wan2.1-vace": (16, 16), "wan2.2-vace-fun-a14b": (16, 16)}
# VACE: 4 main blocks and 2 VACE blocks, so the hints go after blocks 0 and 2 (layers // blocks = 2,
# as the 1.3B's 30 and 15) and a wrong spacing shows; the conditioning latent has 96 channels.
TINY_VACE = dict(num_layers=4, vace_layers=(0, 2), vace_in_dim=96)
FAMILIES = tuple(FAMILY_DEFAULTS)
QUANTS = ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def file_names(quant: str, family: str = "wan2.1-t2v") -> dict[str, str]:
    """Role -> file name (relative to the model directory), as the community names its files."""
    text = {"text_encoder": f"umt5-tiny-encoder-{quant}.gguf"}
    if family == "wan2.1-t2v":
        return {"dit": f"wan2.1-t2v-tiny-{quant}.gguf", **text, "vae": "wan_2.1_vae_tiny.safetensors"}
    if family == "wan2.1-i2v":
        return {"dit": f"wan2.1-i2v-14b-480p-tiny-{quant}.gguf", **text, "vae": "wan_2.1_vae_tiny.safetensors",
                "image_encoder": "clip_vision_h_tiny.safetensors"}
    if family in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        stem = "Wan2.2-T2V-A14B" if family == "wan2.2-t2v-a14b" else "Wan2.2-I2V-A14B"
        return {"dit_high": f"HighNoise/{stem}-tiny-HighNoise-{quant}.gguf",
                "dit_low": f"LowNoise/{stem}-tiny-LowNoise-{quant}.gguf",
                **text, "vae": "wan_2.1_vae_tiny.safetensors"}
    if family == "wan2.2-ti2v-5b":
        return {"dit": f"Wan2.2-TI2V-5B-tiny-{quant}.gguf", **text, "vae": "wan2.2_vae_tiny.safetensors"}
    if family == "wan2.1-vace":  # QuantStack/Wan2.1_14B_VACE-GGUF: Wan2.1_14B_VACE-Q8_0.gguf
        return {"dit": f"Wan2.1_tiny_VACE-{quant}.gguf", **text, "vae": "wan_2.1_vae_tiny.safetensors"}
    if family == "wan2.2-vace-fun-a14b":
        stem = "Wan2.2-VACE-Fun-A14B"
        return {"dit_high": f"HighNoise/{stem}-tiny-HighNoise-{quant}.gguf",
                "dit_low": f"LowNoise/{stem}-tiny-LowNoise-{quant}.gguf",
                **text, "vae": "wan_2.1_vae_tiny.safetensors"}
    raise ValueError(f"--family {family}: tiny models exist for {', '.join(FAMILIES)}")


def random_state_dict(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights for every tensor of a module built on the meta device.

    Matrices get a 1/sqrt(fan_in) scale so activations stay O(1); 1-D weights
    named like norms start near one, other vectors (biases) near zero.
    """
    state = {}
    for name, meta in module.state_dict().items():
        shape = tuple(meta.shape)
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if len(shape) >= 2 and "modulation" not in name:
            fan_in = math.prod(shape[1:])
            values = values / math.sqrt(fan_in)
        elif _is_norm_weight(name):
            values = 1.0 + 0.1 * values
        else:
            values = 0.1 * values
        state[name] = values
    return state


def _is_norm_weight(name: str) -> bool:
    return name.endswith(".weight") and any(part in name for part in ("norm", "layer_norm"))


def make_tiny_model(directory: str | Path, quant: str = "Q8_0", family: str = "wan2.1-t2v") -> dict[str, Path]:
    """Write the tiny model set of `family` into `directory`; returns the path of each file by role."""
    from engine.wan.convert.clip import TINY_CLIP_CONFIG, tiny_clip_vision_state_dict, write_clip_vision_safetensors
    from engine.wan.convert.dit import write_dit_gguf
    from engine.wan.convert.t5 import train_tiny_tokenizer, write_umt5_gguf
    from engine.wan.convert.vae import tiny_vae_state_dict, write_vae_safetensors
    from engine.wan.convert.vae22 import write_tiny_vae22
    from engine.wan.dit import WanConfig, WanModel
    from engine.wan.t5 import UMT5Config, UMT5Encoder
    import sentencepiece as spm

    if quant not in QUANTS:
        raise ValueError(f"--quant {quant}: the tiny model can be written as one of {', '.join(QUANTS)}")
    directory = Path(directory)
    paths = {role: directory / name for role, name in file_names(quant, family).items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator("cpu").manual_seed(SEED)

    proto = train_tiny_tokenizer()
    vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    t5_config = UMT5Config(vocab=vocab, **TINY_T5)
    with torch.device("meta"):
        t5 = UMT5Encoder(t5_config)
    write_umt5_gguf(random_state_dict(t5, generator), proto, paths["text_encoder"], quant=quant)

    in_dim, out_dim = DIT_CHANNELS[family]
    image_dim = TINY_CLIP_CONFIG.hidden_size if "image_encoder" in paths else None
    vace = TINY_VACE if "vace" in family else {}
    dit_config = WanConfig(text_dim=t5_config.dim, image_dim=image_dim,
                           **(TINY_DIT | dict(in_dim=in_dim, out_dim=out_dim) | vace))
    with torch.device("meta"):
        dit = WanModel(dit_config)
    metadata = {
        "wan.attention.head_count": dit_config.num_heads,
        DEFAULTS_KEY: json.dumps(FAMILY_DEFAULTS[family], sort_keys=True),
    }
    for role in ("dit", "dit_high", "dit_low"):  # the high-noise expert drawn before the low-noise one
        if role in paths:
            state = random_state_dict(dit, generator)
            for name in state:
                if ".k_img." in name:  # sharper attention over the image tokens: frames follow the image
                    state[name] = 4 * state[name]
            write_dit_gguf(state, paths[role], quant=quant, metadata=metadata)

    if "image_encoder" in paths:
        write_clip_vision_safetensors(tiny_clip_vision_state_dict(SEED), paths["image_encoder"],
                                      num_heads=TINY_CLIP_CONFIG.num_heads)
    if family == "wan2.2-ti2v-5b":
        write_tiny_vae22(paths["vae"], SEED)
    else:
        write_vae_safetensors(tiny_vae_state_dict(SEED), paths["vae"])
    return paths
