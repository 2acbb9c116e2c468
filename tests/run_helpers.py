"""What the pipeline and fault tests share: manifests in tmp_path, run configs, reading the output."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
