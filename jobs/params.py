"""Render parameters: what a job asks the engine to compute, besides prompt and seed.

Every field is part of a job's identity (`jobs.identity.job_id`), so the values
are normalised here once: integers are Python ints, `guidance` and `shift` are
Python floats (`guidance=5` and `guidance=5.0` are one job), and anything that
is not clearly the right kind of number is refused instead of coerced (a bool is
not an integer, "50" is not a step count, NaN is not a guidance scale).

The single-value checks live in `check_param` so that the manifest reader can
report each bad field of a row with its own reason, and the pydantic model uses
the very same checks.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

# wan/configs/shared_config.py `sample_neg_prompt` (official Wan2.1/2.2), used
# when a job gives no negative prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

SAMPLERS = ("unipc", "euler")

# The render-parameter names, in the order they appear in the output dataset.
# A manifest column with one of these names overrides the default per row.
PARAM_FIELDS = ("width", "height", "frames", "steps", "guidance", "shift", "fps", "sampler")

# Bounds. Sizes are multiples of 16: the VAE downsamples by 8 and the DiT
# patchifies 2x2, so the latent grid must stay even. Frames are 4k+1: the Wan
# VAE keeps the first frame and compresses the rest 4:1 in time.
SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE = 16, 4096, 16
FRAMES_MIN, FRAMES_MAX = 1, 1001
STEPS_MIN, STEPS_MAX = 1, 1000
FPS_MIN, FPS_MAX = 1, 240


def describe(value: Any, limit: int = 40) -> str:
    """A short, bounded description of a bad value for an error message.

    Numbers print bare (``-3``, ``nan``); anything else carries its type
    (``str '50'``, ``bool True``) so that "50" and 50 are told apart.
    """
    bare = value is None or (isinstance(value, (numbers.Integral, float)) and not isinstance(value, bool))
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        text = f"<int of {value.bit_length()} bits>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if bare else f"{type(value).__name__} {text}"


def as_integer(value: Any) -> int:
    """`value` as a Python int, or ValueError: bools, strings and non-integral floats are refused.

    Integral floats (50.0) are accepted because Parquet writers (pandas with a
    null in an int column) often store integers as doubles.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be an integer, got {describe(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    as_float = float(value)
    if not math.isfinite(as_float) or not as_float.is_integer():
        raise ValueError(f"must be an integer, got {describe(value)}")
    return int(as_float)


def as_finite_float(value: Any) -> float:
    """`value` as a finite Python float, or ValueError (bools, strings, NaN, Inf refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be a number, got {describe(value)}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"must be a finite number, got {describe(value)}") from None
    if not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {describe(value)}")
    # -0.0 == 0.0 but serialises differently; one value must have one job id.
    return result + 0.0


def _size(value: Any) -> int:
    n = as_integer(value)
    if not (SIZE_MIN <= n <= SIZE_MAX and n % SIZE_MULTIPLE == 0):
        raise ValueError(f"must be a multiple of {SIZE_MULTIPLE} in {SIZE_MIN}..{SIZE_MAX}, got {describe(n)}")
    return n


def _frames(value: Any) -> int:
    n = as_integer(value)
    if not (FRAMES_MIN <= n <= FRAMES_MAX and n % 4 == 1):
        raise ValueError(f"must be 4k+1 (1, 5, 9, ..., 81, ...) in {FRAMES_MIN}..{FRAMES_MAX}, got {describe(n)}")
    return n


def _steps(value: Any) -> int:
    n = as_integer(value)
    if not STEPS_MIN <= n <= STEPS_MAX:
        raise ValueError(f"must be an integer in {STEPS_MIN}..{STEPS_MAX}, got {describe(n)}")
    return n


def _fps(value: Any) -> int:
    n = as_integer(value)
    if not FPS_MIN <= n <= FPS_MAX:
        raise ValueError(f"must be an integer in {FPS_MIN}..{FPS_MAX}, got {describe(n)}")
    return n


def _guidance(value: Any) -> float:
    x = as_finite_float(value)
    if x < 0:
        raise ValueError(f"must be >= 0, got {x!r}")
    return x


def _shift(value: Any) -> float:
    x = as_finite_float(value)
    if x <= 0:
        raise ValueError(f"must be > 0, got {x!r}")
    return x


def _sampler(value: Any) -> str:
    if not isinstance(value, str) or value not in SAMPLERS:
        raise ValueError(f"must be one of {', '.join(map(repr, SAMPLERS))}, got {describe(value)}")
    return value


_CHECKS = {
    "width": _size,
    "height": _size,
    "frames": _frames,
    "steps": _steps,
    "guidance": _guidance,
    "shift": _shift,
    "fps": _fps,
    "sampler": _sampler,
}
assert tuple(_CHECKS) == PARAM_FIELDS


def check_param(name: str, value: Any) -> int | float | str:
    """The normalised value of render parameter `name`, or ValueError with the reason."""
    return _CHECKS[name](value)


class RenderParams(BaseModel):
    """Everything the engine needs besides prompt, negative prompt and seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int
    height: int
    frames: int
    steps: int
    guidance: float
    shift: float
    fps: int
    sampler: Literal["unipc", "euler"]

    @field_validator(*PARAM_FIELDS, mode="before")
    @classmethod
    def _check(cls, value: Any, info) -> Any:
        return check_param(info.field_name, value)

    def override(self, **changes: Any) -> "RenderParams":
        """A copy with `changes` applied and validated (unlike `model_copy`, which skips validation)."""
        return RenderParams(**{**self.model_dump(), **changes})


# Official Wan2.1 T2V sampling defaults (wan/configs, generate.py): 832x480,
# 81 frames at 16 fps, 50 UniPC steps, guidance 5.0, shift 5.0. Models with other
# defaults (the embedded tiny model) pass their own to the manifest reader.
WAN21_T2V_DEFAULTS = RenderParams(
    width=832, height=480, frames=81, steps=50, guidance=5.0, shift=5.0, fps=16, sampler="unipc"
)
