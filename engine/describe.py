"""What a model file holds: the data behind `reelray inspect`."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.gguf import GGUFFile


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """Kind, architecture, tensor count per GGML type, sizes, and a Wan DiT's inferred config."""
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
        if f.kind == "wan_dit":
            from engine.wan.dit import ModelConfigError, config_name, infer_config

            try:
                config = infer_config({name: f.shape(name) for name in f.tensor_names}, f.metadata)
            except ModelConfigError as err:
                raise ModelConfigError(f"{path}: {err}") from None
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
    return info


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}",
        f"  kind          {info['kind']}",
        f"  architecture  {info['architecture']}",
        f"  tensors       {info['tensors']}  ({', '.join(f'{t}: {n}' for t, n in info['tensor_types'].items())})",
        f"  parameters    {info['parameters']:,}",
        f"  tensor bytes  {info['tensor_bytes']:,}  (file {info['file_bytes']:,})",
    ]
    config = info.get("config")
    if config:
        lines.append(
            f"  wan config    {config['name'] or 'custom'}: dim {config['dim']}, layers {config['num_layers']}, "
            f"heads {config['num_heads']}, ffn {config['ffn_dim']}, in/out channels {config['in_dim']}/{config['out_dim']}, "
            f"text dim {config['text_dim']}"
        )
    return "\n".join(lines)
