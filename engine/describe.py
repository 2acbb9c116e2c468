"""What a model file holds: the data behind `reelray inspect`.

A GGUF file: its kind, tensor counts per type and sizes; a Wan DiT also its
inferred configuration, the family it belongs to and the defaults rendering
will use. A VAE (GGUF or safetensors): Wan2.1 or Wan2.2, from its latent
channels. A file that is readable but not complete (a DiT missing tensors) is
still described, with what is missing named under `problem`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.families import FAMILIES
from engine.families.base import DitFile, ModelSetError, VaeFile, expert_from_name

VAE_NAMES = {16: "Wan2.1 VAE", 48: "Wan2.2 VAE"}


def describe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return describe_gguf(path)  # a broken .gguf gets the GGUF reader's own one-line error
    return describe_safetensors(path)


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """Kind, architecture, tensor count per GGML type, sizes; for a Wan DiT its config and family."""
    from engine.gguf import GGUFFile

    with GGUFFile(path) as f:
        types = Counter(f.qtype(name).name for name in f.tensor_names)
        info: dict[str, Any] = {
            "path": str(path),
            "kind": f.kind,
            "architecture": f.architecture,
            "gguf_version": f.version,
            "tensors": len(f.tensor_names),
            "tensor_types": dict(sorted(types.items())),
            "parameters": f.n_params,
            "tensor_bytes": f.n_bytes,
            "file_bytes": Path(path).stat().st_size,
        }
        shapes = {name: f.shape(name) for name in f.tensor_names}
        if f.kind == "wan_dit":
            _describe_dit(info, Path(path), shapes, f.metadata)
        elif "decoder.conv1.weight" in shapes and len(shapes["decoder.conv1.weight"]) >= 2:
            _describe_vae(info, shapes["decoder.conv1.weight"][1])
    return info


def describe_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors VAE or text encoder, from its header."""
    from engine.model_set import _safetensors_header

    header = _safetensors_header(Path(path))
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    types = Counter(str(v.get("dtype")) for v in tensors.values())
    info: dict[str, Any] = {
        "path": str(path),
        "kind": "unknown",
        "architecture": None,
        "tensors": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "file_bytes": Path(path).stat().st_size,
    }
    conv = tensors.get("decoder.conv1.weight", {}).get("shape")
    if conv and len(conv) >= 2:
        _describe_vae(info, conv[1])
    elif any(name.startswith("encoder.block.") for name in tensors):
        info["kind"] = "umt5"
        info["family"] = "umT5 text encoder (safetensors; needs its SentencePiece .model)"
    elif any(name.startswith(("vision_model.encoder.layers.", "visual.transformer.")) for name in tensors):
        info["kind"] = "clip_vision"
        info["family"] = "CLIP vision encoder (the image encoder of Wan2.1 I2V)"
    return info


def _describe_vae(info: dict[str, Any], z_dim: int) -> None:
    info["kind"] = "vae"
    info["family"] = VAE_NAMES.get(z_dim, f"a VAE with {z_dim} latent channels (not a Wan VAE reelray knows)")


def _describe_dit(info: dict[str, Any], path: Path, shapes: dict, metadata: dict) -> None:
    from engine.model_set import DEFAULTS_KEY, _spec_with_file_defaults
    from engine.wan.dit import ModelConfigError, config_name, infer_config

    try:
        config = infer_config(shapes, metadata)
    except ModelConfigError as err:
        info["problem"] = str(err)
        return
    info["config"] = {
        "name": config_name(config),
        "dim": config.dim,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "ffn_dim": config.ffn_dim,
        "in_dim": config.in_dim,
        "out_dim": config.out_dim,
        "text_dim": config.text_dim,
    }
    if config.vace_layers is not None:
        info["config"]["vace_layers"] = list(config.vace_layers)  # inferred from the block counts
    dit = DitFile(path, config, expert_from_name(path))
    found = family_of(dit)
    if found is None:
        info["family"] = f"no family reelray renders takes a {config.in_dim}->{config.out_dim}-channel DiT"
        return
    family, label = found
    info["family"] = label
    info["family_name"] = family.spec.name
    spec = family.spec
    if DEFAULTS_KEY in metadata:
        try:
            spec = _spec_with_file_defaults(family.spec, path)
        except ModelSetError as err:  # defaults written for another family (a renamed tiny expert)
            info["problem"] = str(err)
    # a parameter a job may leave out (step_list: None) has no default to show
    info["defaults"] = {name: value for name, value in spec.defaults().items() if value is not None}


def family_of(dit: DitFile):
    """(family, label) of one DiT file: the family whose recogniser takes it (an expert together
    with a partner of the same shape), or None."""
    vae = [VaeFile(Path("vae"), dit.config.out_dim)]
    for family in FAMILIES.values():
        dits = [dit]
        if dit.expert is not None:
            other = "low" if dit.expert == "high" else "high"
            dits.append(DitFile(dit.path.with_name(f"{other}-noise-partner"), dit.config, other))
        try:
            if family.recognise(dits, vae) is None:
                continue
        except ValueError:
            continue
        size = {5120: " 14B", 1536: " 1.3B"}.get(dit.config.dim, "") if family.spec.name == "wan2.1-t2v" else ""
        label = family.spec.title + size
        if dit.expert is not None:
            label += f" {dit.expert}-noise expert"
        elif dit.config.dim == 5120 and family.spec.name == "wan2.1-t2v":
            label += " (a Wan2.2 T2V-A14B expert has the same shapes: its file name says HighNoise or LowNoise)"
        return family, label
    return None


def format_description(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}", f"  kind          {info['kind']}"]
    if info.get("family"):
        lines.append(f"  family        {info['family']}")
    if info.get("architecture"):
        lines.append(f"  architecture  {info['architecture']}")
    lines.append(f"  tensors       {info['tensors']}  ({', '.join(f'{t}: {n}' for t, n in info['tensor_types'].items())})")
    if "parameters" in info:
        lines.append(f"  parameters    {info['parameters']:,}")
        lines.append(f"  tensor bytes  {info['tensor_bytes']:,}  (file {info['file_bytes']:,})")
    else:
        lines.append(f"  file bytes    {info['file_bytes']:,}")
    config = info.get("config")
    if config:
        lines.append(
            f"  wan config    {config['name'] or 'custom'}: dim {config['dim']}, layers {config['num_layers']}, "
            f"heads {config['num_heads']}, ffn {config['ffn_dim']}, in/out channels {config['in_dim']}/{config['out_dim']}, "
            f"text dim {config['text_dim']}"
            + (f", VACE hints after blocks {config['vace_layers']}" if "vace_layers" in config else "")
        )
    if info.get("defaults"):
        lines.append("  defaults      " + ", ".join(f"{k} {v}" for k, v in info["defaults"].items()))
    if info.get("problem"):
        lines.append(f"  problem       {info['problem']}")
    return "\n".join(lines)
