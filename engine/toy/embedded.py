"""The trained toy-world model set shipped with reelray (package data), and writing it out as a model set.

`engine/toy/model/` holds what `make toy-model` trained (see engine/toy/train_dit.py):

- `wan2.1-t2v-toy.safetensors`: the Wan2.1 T2V DiT, float16, original Wan
  names, as a checkpoint (the input `reelray quantize` takes); its
  safetensors metadata carries the head count and the render defaults;
- `umt5-toy-encoder-F32.gguf`: the tiny umT5 encoder with the world's
  SentencePiece tokenizer, in the community GGUF layout;
- `wan_2.1_vae_toy.safetensors`: the Wan2.1 VAE, encoder and decoder.

`write_toy_model(dir, quant)` writes these as a Wan2.1 T2V model set, the
DiT in any GGUF type `reelray quantize` writes (through its code): what
`reelray make-tiny-model` and `make demo` use. Their sha256 are pinned in
tests/test_toy_embedded.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
CHECKPOINT = "wan2.1-t2v-toy.safetensors"
TEXT_ENCODER = "umt5-toy-encoder-F32.gguf"
VAE = "wan_2.1_vae_toy.safetensors"
PACKAGE_FILES = (CHECKPOINT, TEXT_ENCODER, VAE)


class ToyModelMissing(FileNotFoundError):
    """The package's trained toy-world files are not there (a broken install, or a checkout without them)."""


def package_file(name: str, source: Path = MODEL_DIR) -> Path:
    path = Path(source) / name
    if not path.is_file():
        raise ToyModelMissing(f"{path}: the trained toy-world file is missing; reinstall reelray or run `make toy-model`")
    return path


def file_names(quant: str) -> dict[str, str]:
    """Role -> file name of the written model set."""
    return {"dit": f"wan2.1-t2v-toy-{quant}.gguf", "text_encoder": TEXT_ENCODER, "vae": VAE}


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (head count, render defaults)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_toy_model(directory: str | Path, quant: str = "Q8_0", source: str | Path = MODEL_DIR) -> dict[str, Path]:
    """Write the trained toy-world model set into `directory`, the DiT quantized to `quant`; paths by role.

    `source` is a folder of the three trained files (default: the package's own)."""
    from engine.model_set import DEFAULTS_KEY
    from engine.wan.convert.dit import quantize_checkpoint
    from engine.wan.dit import HEAD_COUNT_KEY

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {role: directory / name for role, name in file_names(quant).items()}
    checkpoint = package_file(CHECKPOINT, Path(source))
    meta = checkpoint_metadata(checkpoint)
    if HEAD_COUNT_KEY not in meta or DEFAULTS_KEY not in meta:
        raise ToyModelMissing(f"{checkpoint}: no {HEAD_COUNT_KEY!r} / {DEFAULTS_KEY!r} in its metadata: "
                              "not a toy-world checkpoint")
    # `reelray quantize`'s own path: the community rules on what stays F32, the metadata carried over.
    quantize_checkpoint(checkpoint, paths["dit"], quant)
    for role in ("text_encoder", "vae"):
        shutil.copyfile(package_file(paths[role].name, Path(source)), paths[role])
    return paths

