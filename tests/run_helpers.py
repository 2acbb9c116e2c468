"""What the engine, pipeline and fault tests share: manifests in tmp_path, run configs, reading the output, variant models."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.model_set import ModelSet
from pipeline.driver import RunConfig


def write_manifest(path: Path, rows: dict) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


def run_config(tiny_model, manifest, out, **overrides) -> RunConfig:
    return RunConfig(
        manifest=str(manifest), out=str(out), model_files=ModelSet.from_dir(tiny_model).files(), log_every=1e9, **overrides
    )


def metadata(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata")


def write_tiny_dit(path: Path, **changes) -> Path:
    """A tiny DiT GGUF like the embedded one but with `changes` to its WanConfig."""
    from engine.tiny import SEED, TINY_DIT, random_state_dict
    from engine.wan.dit import WanConfig, WanModel, write_dit_gguf

    config = WanConfig(**({"text_dim": 64, **TINY_DIT} | changes))
    with torch.device("meta"):
        dit = WanModel(config)
    state = random_state_dict(dit, torch.Generator().manual_seed(SEED))
    write_dit_gguf(state, path, quant="Q8_0", metadata={"wan.attention.head_count": config.num_heads})
    return path

