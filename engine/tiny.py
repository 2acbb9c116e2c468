"""The embedded default model: a tiny Wan2.1 model set in the real file layouts.

No weights can be downloaded where reelray is built and tested, so the demo,
the tests and the benchmarks render with a tiny random model written here
from a fixed seed: a DiT GGUF with the original Wan names and quantized block
weights (as city96 / QuantStack publish them), a umT5 GGUF with llama.cpp
names and a SentencePiece tokenizer in its metadata, and a VAE safetensors
with the original Wan names. Running it twice writes byte-identical files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.model_set import DEFAULTS_KEY
from jobs.params import RenderParams

SEED = 20250225  # Wan2.1's release date: any fixed number would do.

TINY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)
TINY_T5 = dict(dim=64, heads=4, head_dim=16, ffn_dim=128, num_layers=2)
TINY_DEFAULTS = RenderParams(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=5.0, fps=16, sampler="unipc")
QUANTS = ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def file_names(quant: str) -> dict[str, str]:
    return {
        "dit": f"wan2.1-t2v-tiny-{quant}.gguf",
        "text_encoder": f"umt5-tiny-encoder-{quant}.gguf",
        "vae": "wan_2.1_vae_tiny.safetensors",
    }


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


def make_tiny_model(directory: str | Path, quant: str = "Q8_0") -> dict[str, Path]:
    """Write the tiny model set into `directory`; returns the path of each file by role."""
    from engine.wan.dit import WanConfig, WanModel, write_dit_gguf
    from engine.wan.t5 import UMT5Config, UMT5Encoder, write_umt5_gguf
    from engine.wan.tokenizer import train_tiny_tokenizer
    from engine.wan.vae import tiny_vae_state_dict, write_vae_safetensors
    import sentencepiece as spm

    if quant not in QUANTS:
        raise ValueError(f"--quant {quant}: the tiny model can be written as one of {', '.join(QUANTS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {role: directory / name for role, name in file_names(quant).items()}
    generator = torch.Generator("cpu").manual_seed(SEED)

    proto = train_tiny_tokenizer()
    vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    t5_config = UMT5Config(vocab=vocab, **TINY_T5)
    with torch.device("meta"):
        t5 = UMT5Encoder(t5_config)
    write_umt5_gguf(random_state_dict(t5, generator), proto, paths["text_encoder"], quant=quant)

    dit_config = WanConfig(text_dim=t5_config.dim, **TINY_DIT)
    with torch.device("meta"):
        dit = WanModel(dit_config)
    metadata = {
        "wan.attention.head_count": dit_config.num_heads,
        DEFAULTS_KEY: json.dumps(TINY_DEFAULTS.model_dump(), sort_keys=True),
    }
    write_dit_gguf(random_state_dict(dit, generator), paths["dit"], quant=quant, metadata=metadata)

    write_vae_safetensors(tiny_vae_state_dict(SEED), paths["vae"])
    return paths
