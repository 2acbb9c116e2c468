"""Seeds: the check every seed goes through, and the CLI's seed ranges ("0-99")."""
from __future__ import annotations

import math
from typing import Any

from jobs.identity import SEED_MAX
from jobs.params import as_integer, describe

MAX_SEED_COUNT = 100_000  # seeds one manifest row or one --seeds range may ask for
# A float seed is only exact up to 2**53 (float64 mantissa).
_FLOAT_SEED_MAX = 2**53


def check_seed(value: Any) -> int:
    """A seed as an int in 0..2**63-1, or ValueError with the reason."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) > _FLOAT_SEED_MAX:
        raise ValueError(f"a float seed above 2**53 is not exact; store seeds as integers, got {value!r}")
    seed = as_integer(value)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"must be an integer in 0..2**63-1, got {describe(seed)}")
    return seed


def parse_seed_range(text: str) -> list[int]:
    """Seeds from a CLI range: "7", "0-99", "0-9,20-29" (inclusive, ascending, no overlaps, at most 100000)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"seed range must be like '0-99', '7' or '0-9,20-29', got {text!r:.60}")
    seeds: list[int] = []
    seen: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() and b.strip().isascii() for b in bounds):
            raise ValueError(f"seed range {text!r:.60}: {part.strip()!r:.40} is not 'N' or 'N-M' with N, M >= 0")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise ValueError(f"seed range {text!r:.60}: {lo}-{hi} runs backwards")
        if hi > SEED_MAX:
            raise ValueError(f"seed range {text!r:.60}: seeds must be at most 2**63-1")
        if len(seeds) + (hi - lo + 1) > MAX_SEED_COUNT:
            raise ValueError(f"seed range {text!r:.60}: more than {MAX_SEED_COUNT} seeds")
        for seed in range(lo, hi + 1):
            if seed in seen:
                raise ValueError(f"seed range {text!r:.60}: seed {seed} appears twice")
            seen.add(seed)
            seeds.append(seed)
    return seeds
