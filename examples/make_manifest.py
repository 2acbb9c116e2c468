"""Writes examples/manifest.parquet, the demo manifest: a few prompts x 2 seeds.

    .venv/bin/python examples/make_manifest.py
"""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    ("fox", "A red fox trots through fresh snow at dawn, cinematic, shallow depth of field."),
    ("harbor", "Fishing boats rock gently in a small harbor at sunset, gulls circling overhead."),
    ("city", "Time-lapse of neon city streets in the rain, reflections on wet asphalt."),
    ("forest", "Sunlight filters through a misty pine forest, slow dolly forward."),
]


def main() -> None:
    table = pa.table(
        {
            "clip_id": [clip_id for clip_id, _ in PROMPTS],
            "prompt": [prompt for _, prompt in PROMPTS],
            "seeds": [[0, 1] for _ in PROMPTS],
        }
    )
    path = Path(__file__).with_name("manifest.parquet")
    pq.write_table(table, path)
    print(f"{path}: {table.num_rows} rows")


if __name__ == "__main__":
    main()
