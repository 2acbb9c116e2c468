"""The files that make up one renderable model, and which family they are.

A user points reelray at a directory (the one `reelray make-tiny-model`
writes, a ComfyUI-style `models/` folder, a folder of QuantStack downloads
with `HighNoise/` and `LowNoise/` subfolders) or names the files one by one.
Every file is recognised by its header: a Wan DiT GGUF (and its
configuration, inferred from tensor shapes), a umT5 encoder GGUF (tokenizer in
its metadata) or safetensors (plus a SentencePiece `.model`), a Wan VAE in
safetensors or GGUF (16 latent channels: Wan2.1; 48: Wan2.2), a CLIP vision
encoder (`clip_vision_h.safetensors`, for Wan2.1 I2V). Then each
family's recogniser says whether the DiTs and VAEs are its files; exactly one
must. Names matter only where contents cannot tell: the two A14B experts have
identical shapes, so "high noise" / "low noise" in their names (or
`--dit-high` / `--dit-low`) tells them apart.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.families import FAMILIES, get_family
from engine.families.base import DitFile, ModelSetError, VaeFile, expert_from_name
from jobs.family import FamilySpec
from jobs.identity import model_digest

if TYPE_CHECKING:
    from engine.wan.dit import WanConfig

# Metadata key under which a DiT GGUF may carry its own render defaults
# (the embedded tiny models do; the community files do not).
DEFAULTS_KEY = "reelray.render_defaults"
DIT_ROLES = ("dit", "dit_high", "dit_low")
ROLES = (*DIT_ROLES, "text_encoder", "vae", "image_encoder", "tokenizer")
TEXT_WIDTH_NAMES = ("token_embd.weight", "shared.weight", "encoder.embed_tokens.weight")


@dataclass(frozen=True)
class ModelSet:
    family: str
    files: dict[str, Path]  # role -> path: the family's roles, "text_encoder", optionally "tokenizer"
    spec: FamilySpec  # the family's parameters, with the model file's own defaults where it has them

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], family: str | None = None) -> "ModelSet":
        """The model set in `directory` and its subfolders; `family` restricts recognition to that family."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelSetError(f"{directory}: not a directory")
        paths = sorted(p for p in directory.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
        found: dict[str, list] = {"dit": [], "text_encoder": [], "vae": [], "image_encoder": [], "tokenizer": []}
        for path in paths:
            role = file_role(path)
            if role is not None:
                found[role].append(path)
        dits = [_dit_file(p, expert_from_name(p)) for p in found["dit"]]
        vaes = [_vae_file(p) for p in found["vae"]]
        if not found["text_encoder"]:
            raise ModelSetError(f"{directory}: no text encoder file found (the umT5-XXL encoder, GGUF or safetensors)")
        if len(found["text_encoder"]) > 1:
            names = ", ".join(p.name for p in found["text_encoder"])
            raise ModelSetError(f"{directory}: more than one text encoder file ({names}); name one with --text-encoder")
        tokenizer = found["tokenizer"][0] if len(found["tokenizer"]) == 1 else None
        return cls._build(str(directory), dits, vaes, found["text_encoder"][0], tokenizer, family,
                          found["image_encoder"])

    @classmethod
    def from_files(cls, files: dict[str, str | os.PathLike[str] | None], family: str | None = None) -> "ModelSet":
        """A model set from files named by role (dit, dit_high, dit_low, text_encoder, vae, tokenizer)."""
        files = {role: Path(path) for role, path in files.items() if path is not None}
        unknown = sorted(set(files) - set(ROLES))
        if unknown:
            raise ModelSetError(f"unknown model file roles {unknown}; roles: {', '.join(ROLES)}")
        for role, path in files.items():
            if not path.is_file():
                raise ModelSetError(f"{path}: {role.replace('_', ' ')} file not found")
        for role in ("text_encoder", "vae"):
            if role not in files:
                raise ModelSetError(f"no {role.replace('_', ' ')} file given")
        if not any(role in files for role in DIT_ROLES):
            raise ModelSetError("no DiT file given (--dit, or --dit-high and --dit-low for a Wan2.2 A14B pair)")
        expert = {"dit": None, "dit_high": "high", "dit_low": "low"}
        dits = [_dit_file(files[role], expert[role] or expert_from_name(files[role]))
                for role in DIT_ROLES if role in files]
        image_encoders = [files["image_encoder"]] if "image_encoder" in files else []
        return cls._build("the given files", dits, [_vae_file(files["vae"])], files["text_encoder"],
                          files.get("tokenizer"), family, image_encoders)

    @classmethod
    def _build(cls, where: str, dits: list[DitFile], vaes: list[VaeFile], text_encoder: Path,
               tokenizer: Path | None, family: str | None, image_encoders: list[Path]) -> "ModelSet":
        candidates = [get_family(family)] if family is not None else list(FAMILIES.values())
        matches, near_misses = [], []
        for candidate in candidates:
            try:
                roles = candidate.recognise(dits, vaes)
            except ModelSetError as err:
                near_misses.append(err)
                continue
            if roles is not None:
                matches.append((candidate, roles))
        if len(matches) > 1:
            names = ", ".join(c.spec.name for c, _ in matches)
            raise ModelSetError(f"{where}: the files fit more than one family ({names}); choose one with --family")
        if not matches:
            if near_misses:
                raise near_misses[0]
            raise ModelSetError(f"{where}: {_no_family(dits, vaes, family)}")
        chosen, roles = matches[0]
        files = dict(roles) | {"text_encoder": text_encoder}
        if "image_encoder" in chosen.roles:  # one CLIP image encoder, as the text encoder is found
            if not image_encoders:
                raise ModelSetError(f"{where}: the {chosen.spec.title} family needs its CLIP image encoder "
                                    "(Comfy-Org clip_vision_h.safetensors); none found")
            if len(image_encoders) > 1:
                names = ", ".join(p.name for p in image_encoders)
                raise ModelSetError(f"{where}: more than one image encoder ({names}); name one with --image-encoder")
            files["image_encoder"] = image_encoders[0]
        if tokenizer is not None:
            files["tokenizer"] = tokenizer
        dit = files[chosen.roles[0]]
        spec = chosen.spec.with_defaults(chosen.file_defaults(dit)) if chosen.file_defaults else chosen.spec
        return cls(chosen.spec.name, files, _spec_with_file_defaults(spec, dit))

    def paths(self) -> dict[str, str]:
        """Role -> path as strings (what travels to the render actors)."""
        return {role: str(path) for role, path in self.files.items()}

    def digest(self) -> str:
        """sha256 over the content digests of the files: the model part of a job's identity."""
        return model_digest(self.paths())

    def dit_configs(self) -> dict[str, WanConfig]:
        """{DiT role: its WanConfig}, from the files' headers (what `WanModel(config)` builds, on the meta
        device for checks that need the module tree and no weights: a LoRA against the model)."""
        return {role: _dit_file(self.files[role], None).config for role in DIT_ROLES if role in self.files}

    def lora_fit_check(self) -> Callable[[str], None]:
        """A check that a LoRA file fits this set's DiT(s), from headers alone: every key names a layer
        of the model, in its shape (as `engine.lora.applied` checks at render), the DiTs built on the
        meta device, no weights read. LoraError naming the file, a key and the DiT ("the DiTs A and B"
        for two experts of one shape). The driver runs it on every LoRA a manifest names, so a LoRA
        made for another model is its rows' error at load, not every job's failure on an actor."""
        import torch

        from engine.lora import LoraError, check_lora, read_lora_header
        from engine.wan.dit import WanModel

        @functools.cache  # built on the first LoRA: a run without one pays nothing
        def dits() -> dict[str, torch.nn.Module]:
            by_config: dict = {}
            for role, config in self.dit_configs().items():
                by_config.setdefault(config, []).append(self.files[role].name)
            with torch.device("meta"):
                return {("the DiT " if len(names) == 1 else "the DiTs ") + " and ".join(names): WanModel(config)
                        for config, names in by_config.items()}

        lock = threading.Lock()

        def check(uri: str) -> None:
            lora = read_lora_header(uri)
            with lock:  # the driver checks files from several threads
                built = dits()
            for which, model in built.items():
                try:
                    check_lora(model, lora)
                except LoraError as exc:
                    raise LoraError(f"{exc} ({which})") from None

        return check

    def check_fit(self) -> None:
        """Refuse, from the files' headers alone (no weights read), a set whose parts do not fit together.

        The families' recognisers have matched the DiTs' latent channels to the
        VAE; this checks the text width. The driver calls it before it starts Ray.
        """
        text_dim = _matrix_width(self.files["text_encoder"], TEXT_WIDTH_NAMES)
        for role in DIT_ROLES:
            if role in self.files:
                config = _dit_file(self.files[role], None).config
                if config.text_dim != text_dim:
                    raise ModelSetError(
                        f"{self.files[role]}: the DiT expects {config.text_dim}-wide text embeddings, but the text "
                        f"encoder {self.files['text_encoder'].name} produces {text_dim}-wide ones (Wan uses umT5-XXL, 4096)"
                    )


def _no_family(dits: list[DitFile], vaes: list[VaeFile], family: str | None) -> str:
    what = "; ".join(
        [f"DiT {d.path.name} ({d.config.in_dim}->{d.config.out_dim} channels"
         f"{', ' + d.expert + '-noise expert' if d.expert else ''})" for d in dits]
        + [f"VAE {v.path.name} ({v.z_dim} latent channels)" for v in vaes]
    ) or "no DiT or VAE files"
    if len(dits) == 2 and not any(d.expert for d in dits) and dits[0].config == dits[1].config:
        hint = ("two DiTs of one shape whose names do not say high or low noise: "
                "name the Wan2.2 A14B pair with --dit-high and --dit-low")
    elif not dits:
        hint = "no DiT file"
    else:
        hint = "no family takes these files together"
    scope = f"the {family} family" if family else "reelray's families (" + ", ".join(FAMILIES) + ")"
    return f"{hint}; found {what}; checked {scope}"


def _spec_with_file_defaults(spec: FamilySpec, dit: Path) -> FamilySpec:
    """The family's spec, with the defaults a DiT GGUF carries in its metadata (the tiny models do)."""
    from engine.gguf import GGUFFile

    if dit.suffix != ".gguf":
        return spec
    with GGUFFile(dit) as f:
        raw = f.metadata.get(DEFAULTS_KEY)
    if raw is None:
        return spec
    try:
        return spec.with_defaults(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ModelSetError(f"{dit}: metadata {DEFAULTS_KEY!r}: {exc}") from None


def _dit_file(path: Path, expert: str | None) -> DitFile:
    from engine.gguf import GGUFFile
    from engine.wan.dit import ModelConfigError, infer_config

    with GGUFFile(path) as f:
        try:
            config = infer_config({name: f.shape(name) for name in f.tensor_names}, f.metadata)
        except ModelConfigError as err:
            raise ModelSetError(f"{path}: {err}") from None
    return DitFile(path, config, expert)


def _vae_file(path: Path) -> VaeFile:
    return VaeFile(path, _matrix_width(path, ("decoder.conv1.weight",)))


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
        if any(n.startswith(("vision_model.encoder.layers.", "visual.transformer.")) for n in names):
            return "image_encoder"
        return None
    if path.suffix == ".model":
        return "tokenizer"
    return None


def _matrix_width(path: Path, names: tuple[str, ...]) -> int:
    """The second axis (PyTorch order) of the first of `names` in a GGUF or safetensors file, from its header."""
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
