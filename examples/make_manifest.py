"""Writes the demo manifests and their image.

- examples/manifest.parquet: text to video, toy-world prompts x 2 seeds (the embedded trained toy model),
  four seen in training and two held-out combinations;
- examples/first_frame.png: a 96x64 picture (a sun over hills), drawn here;
- examples/i2v_manifest.parquet: image to video from first_frame.png (the tiny Wan2.2 TI2V-5B model);
  the `image` path is relative to the manifest's folder.

    .venv/bin/python examples/make_manifest.py
"""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Toy-world prompts (engine/toy/world.py) the embedded model was trained on, and two combinations it
# never saw (held out of training: (colour + shape + direction + background) % 10 == 0).
PROMPTS = [
    ("red-circle", "a red circle moving right on a black background"),
    ("green-triangle", "a green triangle moving down on a gray background"),
    ("white-triangle", "a white triangle moving left on a brown background"),
    ("blue-square", "a blue square moving up on a teal background"),
    ("held-out-yellow", "a yellow square moving down on a teal background"),
    ("held-out-purple", "a purple circle moving down on a brown background"),
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

    image = first_frame()
    image_path = Path(__file__).with_name("first_frame.png")
    Image.fromarray(image).save(image_path, optimize=True)
    i2v = pa.table({
        "clip_id": ["sunrise"],
        "prompt": ["The sun rises over green hills, slow push in."],
        "image": [image_path.name],
        "seeds": [[0, 1]],
    })
    i2v_path = Path(__file__).with_name("i2v_manifest.parquet")
    pq.write_table(i2v, i2v_path)
    print(f"{i2v_path}: {i2v.num_rows} rows, image {image_path.name} {image.shape[1]}x{image.shape[0]}")


def first_frame(width: int = 96, height: int = 64) -> np.ndarray:
    """A sky gradient, a sun and two hills: uint8 [height, width, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 100 * y / height, 140 + 80 * y / height, 235 - 40 * y / height], axis=-1)
    image = sky.copy()
    sun = (x - 0.7 * width) ** 2 + (y - 0.35 * height) ** 2 < (0.12 * height) ** 2
    image[sun] = (255, 214, 90)
    hill = y > 0.65 * height - 0.15 * height * np.sin(x / width * np.pi * 2)
    image[hill] = np.stack([40 + 0 * x, 150 - 60 * y / height, 60 + 0 * x], axis=-1)[hill]
    return image.clip(0, 255).astype(np.uint8)


if __name__ == "__main__":
    main()
