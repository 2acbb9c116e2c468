"""What the engine, CLI, pipeline and fault tests share: manifests in tmp_path, run configs, reading the output,
variant models, conditioning images."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.model_set import ModelSet


def write_manifest(path: Path, rows: dict) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


def run_config(tiny_model, manifest, out, **overrides):
    # Imported here: the CUDA tests import this module on the GPU machine, which has no ray (bench/gpu_check.sh).
    from pipeline.driver import RunConfig

    models = ModelSet.from_dir(tiny_model)
    return RunConfig(
        manifest=str(manifest), out=str(out), model_files=models.paths(), family=models.family, log_every=1e9,
        **overrides,
    )


def metadata(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata")


def write_tiny_dit(path: Path, **changes) -> Path:
    """A tiny DiT GGUF like the embedded one but with `changes` to its WanConfig."""
    from engine.tiny import SEED, TINY_DIT, random_state_dict
    from engine.wan.convert.dit import write_dit_gguf
    from engine.wan.dit import WanConfig, WanModel

    config = WanConfig(**({"text_dim": 64, **TINY_DIT} | changes))
    with torch.device("meta"):
        dit = WanModel(config)
    state = random_state_dict(dit, torch.Generator().manual_seed(SEED))
    write_dit_gguf(state, path, quant="Q8_0", metadata={"wan.attention.head_count": config.num_heads})
    return path



def write_png(path: Path, flip: bool = False) -> Path:
    """An 80x48 RGB gradient (not square, so a resize rule that ignored the aspect ratio would show);
    `flip` mirrors it left to right: another image of the same size."""
    from PIL import Image

    y, x = np.mgrid[0:48, 0:80]
    pixels = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels).save(path)
    return path


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread for the block, then back to what it was: tiny tensors run faster that way on
    this shared 2-core machine, and bitwise determinism is per thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
