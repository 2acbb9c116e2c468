"""How well a rendered clip shows its toy-world prompt, read off the pixels alone.

No learned model: each attribute is measured directly.

- background: the median colour of the frame border over all frames, nearest
  BACKGROUND_RGB;
- colour: the median colour of the pixels well away from the background,
  nearest COLOUR_RGB (then re-read from the inside of the blob below);
- foreground: each pixel's position on the line from the background to that
  colour, lightly smoothed against noise and cut half-way, where a blurred or
  antialiased edge crosses; each frame keeps its largest connected blob;
- shape: how the blob's width near the top of its bounding box compares with
  its width near the bottom (an upright triangle ~1/3, the others ~1), then
  how far it reaches along the diagonals against the axes (square 2, circle
  sqrt(2)), medians over frames; how it fills its box (square ~1, circle
  ~pi/4, triangle ~1/2) and the share of it in the box's top half (triangle
  ~1/4, the others ~1/2), the cues used before, are measured too;
- direction: the dominant axis and sign of the blob centroid's track, from a
  Theil-Sen (median of pairwise slopes) line, so a few bad frames do not
  turn it.

A measurement that cannot be made (no foreground, a shape that does not move,
a diagonal track) predicts None, which scores as wrong.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.toy.world import BACKGROUND_RGB, COLOUR_RGB, Scene

ATTRIBUTES = ("colour", "shape", "direction", "background")

BORDER = 2  # pixel rows/columns of the frame edge read for the background
NOISE_FLOOR = 40.0  # RGB distance that counts as "maybe foreground" before the shape's colour is known
MIN_CONTRAST = 60.0  # a foreground colour closer than this to the background is noise, not a shape
MIN_BLOB = 6  # pixels: a smaller blob is no shape in that frame
EXTENT_MIN = 2  # pixels a row/column of the blob needs to count towards its box: a lone noisy pixel does not
MIN_SHAPE_FRAMES = 0.5  # share of frames that must show a shape
MIN_TRAVEL = 0.10  # of the frame side: less displacement over the clip is "not moving"
MAX_CROSS_AXIS = 0.5  # off-axis displacement over on-axis: more is a diagonal, no direction
# The shape's cuts sit where the toy VAE puts the shapes: its reconstructions of ground-truth clips
# (encode, then decode, no DiT; 80 clips per shape), which blur a triangle's apex and round a
# square's corners. Whatever the scorer then misses in a render is the DiT's.
# Triangle or not, by the taper (width near the top over width near the bottom; upright triangle
# ~1/3, others ~1): reconstructed triangles reach 0.70, circles and squares go down to 0.88 (ground
# truth, clean or noisy and blurred: triangles <= 0.44, the others >= 0.96). The top half's share of
# the area, the cue used before, leaves less room there (triangles <= 0.43, circles >= 0.47).
TRIANGLE_TAPER = 0.79
# Square or circle, by the diagonal reach: the blob's extents along the two diagonals over those
# along the axes, (D1 + D2) / (W + H); sqrt(2) for a disc, 2 for an axis-aligned square.
# Reconstructed circles reach 1.55, squares go down to 1.60 (ground truth: circles <= 1.50, squares
# >= 1.85). The fill ratio, the cue used before, leaves less room there (circles <= 0.85, squares
# >= 0.85).
SQUARE_REACH = 1.58


@dataclass
class Score:
    """Per-attribute agreement of a clip with its scene, and what was read off the clip."""

    colour: bool
    shape: bool
    direction: bool
    background: bool
    all: bool
    predicted: dict[str, str | None]


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    distances = np.linalg.norm(np.array([table[name] for name in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _check(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        what = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"adherence needs uint8 frames [F, H, W, 3], got {what}")
    if frames.shape[0] < 2 or min(frames.shape[1:3]) <= 2 * BORDER + 2:
        raise ValueError(f"adherence needs at least 2 frames larger than {2 * BORDER + 2} pixels, got {frames.shape}")
    return frames


def _largest_blobs(mask: np.ndarray) -> np.ndarray:
    """Keep, in each frame of mask [F, H, W], only its largest 4-connected blob."""
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    if not len(rows):
        return mask
    # Label within the box holding every frame's mask: a moving shape leaves most of the frame empty.
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    kept = np.zeros_like(mask)
    kept[box] = _largest_blobs_in(mask[box])
    return kept


def _flood_runs(labels: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Give every pixel the largest label of its unbroken run of mask pixels along `axis`."""
    # A running maximum that restarts at each gap: keying every run by its
    # position along the line puts a later run above everything before it.
    step = labels.size + 1
    gaps = np.cumsum(~mask, axis=axis, dtype=labels.dtype)
    forward = np.maximum.accumulate(gaps * step + labels, axis=axis) - gaps * step
    flipped = np.flip(gaps.max(axis=axis, keepdims=True) - gaps, axis)
    backward = np.flip(np.maximum.accumulate(flipped * step + np.flip(labels, axis), axis=axis) - flipped * step, axis)
    return np.where(mask, np.maximum(forward, backward), 0)


def _largest_blobs_in(mask: np.ndarray) -> np.ndarray:
    """`_largest_blobs` on a mask already cut to its box."""
    frames, height, width = mask.shape
    # Number every pixel, then spread the largest number through each blob by
    # whole rows and columns at a time: a few sweeps for a roughly convex blob.
    # Keys in _flood_runs reach (line length + 1) * (size + 1): int32 when they fit.
    dtype = np.int32 if (max(height, width) + 1) * (mask.size + 1) < 2**31 else np.int64
    labels = np.where(mask, np.arange(1, mask.size + 1, dtype=dtype).reshape(mask.shape), 0)
    while True:
        spread = _flood_runs(_flood_runs(labels, mask, 2), mask, 1)
        if np.array_equal(spread, labels):
            break
        labels = spread
    # Labels of frame f lie in f*H*W + 1 .. (f+1)*H*W, so a per-frame bincount row finds its biggest blob.
    sizes = np.bincount(labels.ravel(), minlength=mask.size + 1)[1:].reshape(frames, height * width)
    biggest = sizes.argmax(axis=1) + 1 + np.arange(frames) * height * width
    return (labels == biggest[:, None, None]) & mask


def _theil_sen_slope(t: np.ndarray, v: np.ndarray) -> float:
    """Median of the slopes between every pair of points: a line fit that ignores a few wild points."""
    i, j = np.triu_indices(len(t), k=1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i])))


def _smooth(plane: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] / 4 blur over the rows and columns of [F, H, W], edges repeated."""
    padded = np.concatenate([plane[:, :1], plane, plane[:, -1:]], axis=1)
    plane = (padded[:, :-2] + padded[:, 2:]) * 0.25 + padded[:, 1:-1] * 0.5
    padded = np.concatenate([plane[:, :, :1], plane, plane[:, :, -1:]], axis=2)
    return (padded[:, :, :-2] + padded[:, :, 2:]) * 0.25 + padded[:, :, 1:-1] * 0.5


def _extent(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index, per row of counts [F, N], holding at least EXTENT_MIN pixels (else any)."""
    solid = counts >= EXTENT_MIN
    solid = np.where(solid.any(axis=1, keepdims=True), solid, counts > 0)
    first = solid.argmax(axis=1)
    last = counts.shape[1] - 1 - solid[:, ::-1].argmax(axis=1)
    return first, last


def measure(frames: np.ndarray) -> dict:
    """The raw measurements behind `predict`, for reports and tuning.

    Always: background_rgb, foreground_rgb (None without a foreground) and
    frames_with_shape. When enough frames show a blob: fill, top_share, taper
    and diagonal_reach (medians over those frames), displacement (dx, dy) in pixels over the
    clip from the centroid track, and frame_side.
    """
    frames = _check(frames)
    count, height, width, _ = frames.shape
    # Channels first, so each step below runs over whole planes rather than triples.
    planes = np.moveaxis(frames, -1, 0).astype(np.float32)  # [3, F, H, W]

    edge = np.ones((height, width), bool)
    edge[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = np.median(planes[:, :, edge].reshape(3, -1), axis=1)
    squared = sum((plane - value) ** 2 for plane, value in zip(planes, background_rgb))
    out = {"background_rgb": background_rgb, "foreground_rgb": None, "frames_with_shape": 0}

    # A loose cut, above the noise the border shows, finds the shape's colour (squared distances throughout).
    loose = squared > max(NOISE_FLOOR**2, 9.0 * float(np.median(squared[:, edge])))
    if loose.sum() < MIN_BLOB * count * MIN_SHAPE_FRAMES:
        return out
    foreground_rgb = np.median(planes[:, loose], axis=1)
    contrast = float(np.linalg.norm(foreground_rgb - background_rgb))
    if contrast < MIN_CONTRAST:
        return out
    # How far each pixel lies from the background towards that colour (0 .. 1), lightly
    # smoothed against noise; the mask is cut half-way, where an antialiased or blurred
    # edge crosses, so the blob keeps the shape's true size.
    towards = (foreground_rgb - background_rgb) / contrast**2
    along = _smooth(np.tensordot(towards, planes, axes=1) - towards @ background_rgb)
    mask = _largest_blobs(along > 0.5)
    core = mask & (along > 0.75)  # the colour from the blob's inside, not its blended edge
    out["foreground_rgb"] = np.median(planes[:, core], axis=1) if core.any() else foreground_rgb

    areas = mask.sum(axis=(1, 2))
    shown = np.flatnonzero(areas >= MIN_BLOB)
    out["frames_with_shape"] = len(shown)
    if len(shown) < max(2, MIN_SHAPE_FRAMES * count):
        return out

    mask, areas = mask[shown], areas[shown]
    row_counts, col_counts = mask.sum(axis=2), mask.sum(axis=1)  # [S, H], [S, W]
    y0, y1 = _extent(row_counts)
    x0, x1 = _extent(col_counts)
    fills = areas / ((y1 - y0 + 1) * (x1 - x0 + 1))
    # The same extents along the two diagonals: pixels binned by x + y and by x - y. A pixel's
    # square reaches one bin further each way along a diagonal than its centre, hence + 2.
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    reach = 0.0
    for index in (ys + xs, ys - xs + width - 1):
        bins = np.zeros((len(mask), height + width - 1))
        for frame, one in enumerate(mask):
            bins[frame] = np.bincount(index[one], minlength=height + width - 1)
        d0, d1 = _extent(bins)
        reach = reach + (d1 - d0 + 2)
    diagonal_reaches = reach / ((y1 - y0 + 1) + (x1 - x0 + 1))
    # Rows strictly above the box's middle line count fully, the middle row (odd heights) half.
    rows = np.arange(height)[None, :]
    middle = (y0 + y1)[:, None] / 2
    top_shares = (row_counts * ((rows < middle) + 0.5 * (rows == middle))).sum(axis=1) / areas
    # Width near the top of the box over width near its bottom: the mean row count over rows at 15-35%
    # of the box's height against 65-85% (an upright triangle ~1/3, a circle or square ~1).
    spans = (y1 - y0)[:, None]
    place = (rows - y0[:, None]) / np.maximum(spans, 1)
    upper = (place >= 0.15) & (place <= 0.35)
    lower = (place >= 0.65) & (place <= 0.85)
    tapers = ((row_counts * upper).sum(axis=1) / np.maximum(upper.sum(axis=1), 1)) / np.maximum(
        (row_counts * lower).sum(axis=1) / np.maximum(lower.sum(axis=1), 1), 1)
    centroid_x = (col_counts * np.arange(width)).sum(axis=1) / areas
    centroid_y = (row_counts * rows).sum(axis=1) / areas
    out["fill"] = float(np.median(fills))
    out["top_share"] = float(np.median(top_shares))
    out["diagonal_reach"] = float(np.median(diagonal_reaches))
    out["taper"] = float(np.median(tapers))
    # Pixels travelled over the whole clip along x (right +) and y (down +).
    out["displacement"] = tuple(_theil_sen_slope(shown.astype(np.float64), track) * (count - 1)
                                for track in (centroid_x, centroid_y))
    out["frame_side"] = min(height, width)
    return out


def predict(frames: np.ndarray) -> dict[str, str | None]:
    """What the clip shows: {"colour", "shape", "direction", "background"} -> name, or None if unreadable."""
    m = measure(frames)
    predicted = {"colour": None, "shape": None, "direction": None,
                 "background": _nearest(m["background_rgb"], BACKGROUND_RGB)}
    if m["foreground_rgb"] is not None:
        predicted["colour"] = _nearest(m["foreground_rgb"], COLOUR_RGB)
    if "fill" not in m:
        return predicted

    if m["taper"] < TRIANGLE_TAPER:
        predicted["shape"] = "triangle"
    else:
        predicted["shape"] = "square" if m["diagonal_reach"] >= SQUARE_REACH else "circle"

    dx, dy = m["displacement"]
    along, across = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if along >= MIN_TRAVEL * m["frame_side"] and across <= MAX_CROSS_AXIS * along:
        if abs(dx) >= abs(dy):
            predicted["direction"] = "right" if dx > 0 else "left"
        else:
            predicted["direction"] = "down" if dy > 0 else "up"  # image rows grow downwards
    return predicted


def score_clip(frames: np.ndarray, scene: Scene) -> Score:
    """Which of the scene's attributes the clip shows."""
    predicted = predict(frames)
    hits = {name: predicted[name] == getattr(scene, name) for name in ATTRIBUTES}
    return Score(**hits, all=all(hits.values()), predicted=predicted)


def accuracy(scores: list[Score]) -> dict[str, float]:
    """Share of clips right on each attribute and on all four together."""
    if not scores:
        raise ValueError("accuracy needs at least one Score")
    return {name: float(np.mean([getattr(score, name) for score in scores])) for name in (*ATTRIBUTES, "all")}


# -- scoring a rendered dataset ---------------------------------------------------------------------


@dataclass
class Scored:
    """One rendered video of an output dataset and how it scored against its own prompt."""

    job_id: str
    prompt: str
    seed: int
    held_out: bool
    score: Score
    row: dict


def score_output(out: str | Path, frames_of: Callable[[Path], np.ndarray] | None = None) -> list[Scored]:
    """Score every video of a `reelray run` output directory against the prompt in its own metadata row.

    Reads `OUT/metadata` (the compacted dataset, one Parquet folder) and the
    MP4 each row's `file_name` names; rows whose prompt is not a toy-world
    prompt are skipped (ValueError if none is). Scoring each video against
    its own row's prompt is what catches one job's frames landing under
    another job's name.
    """
    import pyarrow.parquet as pq

    from engine.video import read_mp4
    from engine.toy.world import parse_prompt

    out = Path(out)
    frames_of = frames_of or read_mp4
    rows = pq.read_table(out / "metadata").to_pylist()
    scored = []
    for row in rows:
        try:
            scene = parse_prompt(row["prompt"])
        except ValueError:
            continue
        score = score_clip(frames_of(out / row["file_name"]), scene)
        scored.append(Scored(row["job_id"], row["prompt"], int(row["seed"]), scene.held_out, score, row))
    if not scored:
        raise ValueError(f"{out}: no video of a toy-world prompt to score ({len(rows)} rows)")
    return scored


def format_accuracy(label: str, scores: Sequence[Score]) -> str:
    """One line: the label, the count and the accuracy per attribute and for all four together."""
    acc = accuracy(list(scores))
    return f"{label:<28s} n={len(scores):<4d} " + "  ".join(f"{name} {100 * value:5.1f}%" for name, value in acc.items())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.toy.adherence",
                                     description="Score the toy-world videos of a `reelray run` output against their prompts.")
    parser.add_argument("out", help="the run's output directory")
    parser.add_argument("--verbose", action="store_true", help="also print one line per video")
    args = parser.parse_args(argv)
    scored = score_output(args.out)
    if args.verbose:
        for item in scored:
            wrong = [f"{name}: {item.score.predicted[name]}" for name in ATTRIBUTES if not getattr(item.score, name)]
            print(f"{'ok   ' if item.score.all else 'MISS '} seed {item.seed:<4d} {item.prompt!r:70s} {'; '.join(wrong)}")
    print(f"adherence of {len(scored)} videos in {args.out} (read off the pixels, engine/toy/adherence.py):")
    for label, held in (("seen combinations", False), ("held-out combinations", True)):
        group = [item.score for item in scored if item.held_out == held]
        if group:
            print("  " + format_accuracy(label, group))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
