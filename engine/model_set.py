"""The files that make up one renderable model, found by what they hold.

A user points reelray at a directory (the one `reelray make-tiny-model`
writes, or a ComfyUI-style `models/` folder holding one DiT, one umT5 encoder
and one VAE) or names the files one by one. Files are recognised by their
contents, never by their names: a Wan DiT GGUF, a umT5 GGUF (tokenizer in its
metadata) or safetensors (plus a SentencePiece `.model`), and a Wan VAE in
safetensors (or GGUF).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jobs.identity import model_digest
from jobs.params import WAN21_T2V_DEFAULTS, RenderParams

# Metadata key under which a DiT GGUF may carry its own render defaults
# (the embedded tiny model does; the community files do not).
DEFAULTS_KEY = "reelray.render_defaults"


class ModelSetError(ValueError):
    """The given files do not make one complete, unambiguous model set."""


@dataclass(frozen=True)
class ModelSet:
    dit: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None = None

    @classmethod
    def from_dir(cls, directory: str | Path) -> "ModelSet":
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelSetError(f"{directory}: not a directory")
        found: dict[str, list[Path]] = {"dit": [], "text_encoder": [], "vae": [], "tokenizer": []}
        for path in sorted(directory.iterdir()):
            role = file_role(path)
            if role is not None:
                found[role].append(path)
        for role in ("dit", "text_encoder", "vae"):
            if not found[role]:
                raise ModelSetError(f"{directory}: no {role.replace('_', ' ')} file found")
            if len(found[role]) > 1:
                names = ", ".join(p.name for p in found[role])
                raise ModelSetError(f"{directory}: more than one {role.replace('_', ' ')} file ({names}); name them with --dit/--text-encoder/--vae")
        tokenizer = found["tokenizer"][0] if len(found["tokenizer"]) == 1 else None
        return cls(found["dit"][0], found["text_encoder"][0], found["vae"][0], tokenizer)

    @classmethod
    def from_files(cls, dit: str | Path, text_encoder: str | Path, vae: str | Path, tokenizer: str | Path | None = None) -> "ModelSet":
        for role, path in (("dit", dit), ("text encoder", text_encoder), ("vae", vae), ("tokenizer", tokenizer)):
            if path is not None and not Path(path).is_file():
                raise ModelSetError(f"{path}: {role} file not found")
        return cls(Path(dit), Path(text_encoder), Path(vae), Path(tokenizer) if tokenizer else None)

    def files(self) -> dict[str, str]:
        files = {"dit": str(self.dit), "text_encoder": str(self.text_encoder), "vae": str(self.vae)}
        if self.tokenizer is not None:
            files["tokenizer"] = str(self.tokenizer)
        return files

    def digest(self) -> str:
        """sha256 over the content digests of the files: the model part of a job's identity."""
        return model_digest(self.files())

    def check_fit(self) -> None:
        """Refuse, from the files' headers alone (no weights read), a set whose parts do not fit together.

        The driver calls this before it starts Ray or loads anything, so a
        mismatched set costs a second, not a cluster start and a model load.
        """
        from engine.gguf import GGUFFile
        from engine.wan.dit import ModelConfigError, infer_config

        with GGUFFile(self.dit) as f:
            try:
                dit_config = infer_config({name: f.shape(name) for name in f.tensor_names}, f.metadata)
            except ModelConfigError as err:
                raise ModelSetError(f"{self.dit}: {err}") from None
        text_dim = _matrix_width(self.text_encoder, ("token_embd.weight", "shared.weight", "encoder.embed_tokens.weight"))
        z_dim = _matrix_width(self.vae, ("decoder.conv1.weight",))
        check_compatible(self, dit_config, text_dim, z_dim)

    def render_defaults(self) -> RenderParams:
        """The model's own defaults: from the DiT's metadata when it carries them, else Wan2.1's."""
        from engine.gguf import GGUFFile

        if self.dit.suffix != ".gguf":
            return WAN21_T2V_DEFAULTS
        with GGUFFile(self.dit) as f:
            raw = f.metadata.get(DEFAULTS_KEY)
        if raw is None:
            return WAN21_T2V_DEFAULTS
        return RenderParams(**json.loads(raw))


def file_role(path: Path) -> str | None:
    """'dit', 'text_encoder', 'vae', 'tokenizer' or None, from the file's contents."""
    if not path.is_file():
        return None
    if path.suffix == ".gguf":
        from engine.gguf import GGUFFile

        with GGUFFile(path) as f:
            kind = f.kind
            names = f.tensor_names
        if kind == "wan_dit":
            return "dit"
        if kind == "umt5":
            return "text_encoder"
        if any(n.startswith("decoder.") for n in names):
            return "vae"
        return None
    if path.suffix == ".safetensors":
        names = _safetensors_names(path)
        if any(n.startswith("decoder.") for n in names):
            return "vae"
        if any(n.startswith("encoder.block.") for n in names):
            return "text_encoder"
        return None
    if path.suffix == ".model":
        return "tokenizer"
    return None


def check_compatible(models: ModelSet, dit_config, text_dim: int, z_dim: int) -> None:
    """Refuse, in one line, a model set whose DiT does not fit its VAE's latents or its text encoder's width.

    Otherwise every job would fail the same way deep inside a matmul, each
    after its retries, and an overnight batch would end as a table of
    identical failed rows.
    """
    if dit_config.in_dim != z_dim or dit_config.out_dim != z_dim:
        hint = " (Wan2.2 TI2V-5B works on the Wan2.2 VAE's 48-channel latents, which reelray does not support yet)" \
            if dit_config.in_dim == 48 else ""
        raise ModelSetError(
            f"{models.dit}: the DiT takes {dit_config.in_dim}-channel latents and returns {dit_config.out_dim}, "
            f"but the VAE {models.vae.name} decodes {z_dim}-channel latents{hint}"
        )
    if dit_config.text_dim != text_dim:
        raise ModelSetError(
            f"{models.dit}: the DiT expects {dit_config.text_dim}-wide text embeddings, "
            f"but the text encoder {models.text_encoder.name} produces {text_dim}-wide ones (Wan uses umT5-XXL, 4096)"
        )


def _matrix_width(path: Path, names: tuple[str, ...]) -> int:
    """The last axis (PyTorch order) of the first of `names` in a GGUF or safetensors file, from its header."""
    if path.suffix == ".gguf":
        from engine.gguf import GGUFFile

        with GGUFFile(path) as f:
            shapes = {name: tuple(f.shape(name)) for name in names if name in f.tensor_names}
    else:
        header = _safetensors_header(path)
        shapes = {name: tuple(header[name].get("shape", ())) for name in names
                  if isinstance(header.get(name), dict)}
    for name in names:
        shape = shapes.get(name)
        if shape is not None:
            if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ModelSetError(f"{path}: tensor {name!r} has shape {list(shape)}")
            return shape[1]
    raise ModelSetError(f"{path}: none of {', '.join(names)} found")


def _safetensors_names(path: Path) -> list[str]:
    return [k for k in _safetensors_header(path) if k != "__metadata__"]


def _safetensors_header(path: Path) -> dict:
    # The header is JSON after an 8-byte little-endian length: enough to tell
    # what the file is without opening the tensors.
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ModelSetError(f"{path}: not a safetensors file (truncated header)")
        size = int.from_bytes(head, "little")
        if size > min(path.stat().st_size - 8, 100 << 20):
            raise ModelSetError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelSetError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelSetError(f"{path}: not a safetensors file (header is not an object)")
    return header
