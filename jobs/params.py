"""Render parameters: what a job asks the engine to compute, besides prompt, seed and inputs.

Which parameters exist, their defaults and their bounds belong to a model
family (`engine/families/`), which declares them as `ParamSpec`s; this module
only knows how to check and normalise a value against a spec. Every value is
part of a job's identity (`jobs.identity`), so values are normalised once:
integers are Python ints, floats are Python floats (`guidance=5` and
`guidance=5.0` are one job), and anything that is not clearly the right kind of
value is refused instead of coerced (a bool is not an integer, "50" is not a
step count, NaN is not a guidance scale). A parameter whose default is None
(`step_list`) is "not given" until a job gives it; not given, it is left out
of the job's identity, so adding such a parameter keeps every existing job id.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# wan/configs/shared_config.py `sample_neg_prompt` (official Wan2.1/2.2), used
# when a job gives no negative prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


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


@dataclass(frozen=True)
class ParamSpec:
    """One render parameter of a family: its kind, default and bounds.

    `kind` "int": an integer in low..high; with `multiple` it must also be
    `remainder` modulo `multiple` (sizes: multiples of 16; frames: 4k+1).
    `kind` "float": a finite number >= low (> low when `low_open`), <= high.
    `kind` "choice": one of `choices`.
    `kind` "int_list": a non-empty, strictly increasing list of integers in
    low..high, normalised to a tuple; None (not given) when `default` is None.
    """

    name: str
    kind: Literal["int", "float", "choice", "int_list"]
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    multiple: int | None = None
    remainder: int = 0
    choices: tuple[str, ...] = ()
    help: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", self.check(self.default))

    def check(self, value: Any) -> int | float | str | tuple[int, ...] | None:
        """The normalised value, or ValueError with the reason (without the parameter's name)."""
        if self.kind == "int_list":
            return None if value is None else self._int_list(value)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {describe(value)}")
            return value
        if self.kind == "int":
            n = as_integer(value)
            in_range = self.low <= n <= self.high
            if self.multiple is None:
                if not in_range:
                    raise ValueError(f"must be an integer in {self.low}..{self.high}, got {describe(n)}")
            elif not in_range or n % self.multiple != self.remainder:
                raise ValueError(f"must be {self._pattern()} in {self.low}..{self.high}, got {describe(n)}")
            return n
        x = as_finite_float(value)
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            raise ValueError(f"must be {'>' if self.low_open else '>='} {self.low:g}, got {x!r}")
        if self.high is not None and x > self.high:
            raise ValueError(f"must be <= {self.high:g}, got {x!r}")
        return x

    def _int_list(self, value: Any) -> tuple[int, ...]:
        # A manifest cell arrives as a list; a RenderParams value as a tuple. A string
        # ("0,250") is not a list: the CLI splits its flag itself.
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list of integers, got {describe(value)}")
        if not value:
            raise ValueError("must hold at least one integer, got an empty list")
        items = []
        for k, item in enumerate(value):
            try:
                n = as_integer(item)
            except ValueError as exc:
                raise ValueError(f"element {k}: {exc}") from None
            if not self.low <= n <= self.high:
                raise ValueError(f"element {k}: must be an integer in {self.low}..{self.high}, got {describe(n)}")
            if items and n <= items[-1]:
                raise ValueError(f"must increase strictly, got {items[-1]} then {n} (elements {k - 1}, {k})")
            items.append(n)
        return tuple(items)

    def _pattern(self) -> str:
        m, r = self.multiple, self.remainder
        if r == 0:
            return f"a multiple of {m}"
        examples = ", ".join(str(r + m * k) for k in range(3))
        return f"{m}k+{r} ({examples}, ...)"


def size_param(name: str, default: int, multiple: int, high: int = 4096) -> ParamSpec:
    return ParamSpec(name, "int", default, low=multiple, high=high, multiple=multiple,
                     help=f"pixels, a multiple of {multiple}")


def frames_param(default: int, temporal_stride: int = 4, high: int = 1001) -> ParamSpec:
    # The Wan VAEs keep the first frame and compress the rest `temporal_stride`:1 in time.
    return ParamSpec("frames", "int", default, low=1, high=high, multiple=temporal_stride, remainder=1,
                     help=f"{temporal_stride}k+1 frames")


def steps_param(default: int) -> ParamSpec:
    return ParamSpec("steps", "int", default, low=1, high=1000, help="denoising steps")


def guidance_param(name: str, default: float, help: str = "classifier-free guidance scale") -> ParamSpec:
    return ParamSpec(name, "float", default, low=0.0, help=help)


def shift_param(default: float) -> ParamSpec:
    return ParamSpec("shift", "float", default, low=0.0, low_open=True, help="sigma schedule shift")


def fps_param(default: int) -> ParamSpec:
    return ParamSpec("fps", "int", default, low=1, high=240, help="frames per second of the MP4")


# "lcm": the Wan2.1 step-distill step (x0, then fresh noise to the next sigma);
# engine.sampling.lcm.
SAMPLERS = ("unipc", "euler", "lcm")


def sampler_param(default: str = "unipc") -> ParamSpec:
    return ParamSpec("sampler", "choice", default, choices=SAMPLERS, help="solver")


def step_list_param() -> ParamSpec:
    # LightX2V's step-distilled Wan models (`denoising_step_list`): indices into the
    # 1000-entry shifted sigma table; engine.sampling.schedule.distill_schedule.
    return ParamSpec("step_list", "int_list", None, low=0, high=999,
                     help="step-distilled sampling: indices 0..999 into the 1000-entry shifted sigma table, "
                          "strictly increasing; sets steps to its length")


class RenderParams(Mapping):
    """A family's validated render parameters: an immutable, hashable mapping with attribute access.

    Build one with `FamilySpec.params(...)`, which checks every value against
    the family's `ParamSpec`s; `params.width` and `params["width"]` read it.
    """

    __slots__ = ("_values", "_key")

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_key", tuple(sorted(self._values.items())))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no render parameter {name!r} (parameters: {', '.join(self._values)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("RenderParams is immutable; use FamilySpec.params(base, **changes)")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RenderParams):
            return self._key == other._key
        return NotImplemented

    def __repr__(self) -> str:
        return f"RenderParams({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self):
        return (RenderParams, (self._values,))

    def model_dump(self) -> dict[str, Any]:
        """The values as a plain dict, in the family's declaration order."""
        return dict(self._values)
