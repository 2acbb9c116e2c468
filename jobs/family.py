"""What `jobs/` knows of a model family: its name, render parameters and conditioning inputs.

A family (Wan2.1 T2V, Wan2.2 T2V-A14B, ...) lives in `engine/families/`; it
hands the driver this torch-free declaration, and the manifest reader,
`reelray render` and the job identity work from it alone. No family's rules
are written in `jobs/`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from jobs.params import DEFAULT_NEGATIVE_PROMPT, ParamSpec, RenderParams


@dataclass(frozen=True)
class InputSpec:
    """A conditioning input: a manifest column (and `reelray render` flag) naming a file."""

    name: str  # the manifest column, e.g. "image"
    kind: Literal["image"]
    required: bool
    help: str = ""


@dataclass(frozen=True)
class FamilySpec:
    """A family's declaration: render parameters (with defaults and bounds) and inputs."""

    name: str  # "wan2.1-t2v", the value of the dataset's `family` column
    title: str  # "Wan2.1 T2V"
    param_specs: tuple[ParamSpec, ...]
    inputs: tuple[InputSpec, ...] = ()
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    _by_name: dict[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {spec.name: spec for spec in self.param_specs}
        if len(by_name) != len(self.param_specs):
            raise ValueError(f"family {self.name}: duplicate parameter names")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def check_param(self, name: str, value: Any) -> int | float | str:
        """The normalised value of parameter `name`, or ValueError with the reason."""
        spec = self._by_name.get(name)
        if spec is None:
            raise ValueError(
                f"the {self.title} family has no parameter {name!r} (its parameters: {', '.join(self.param_names)})"
            )
        return spec.check(value)

    def defaults(self) -> RenderParams:
        return RenderParams({spec.name: spec.default for spec in self.param_specs})

    def params(self, base: RenderParams | None = None, **changes: Any) -> RenderParams:
        """`base` (the defaults when None) with `changes` checked and applied.

        Raises ValueError naming the first bad parameter: "width: must be ...".
        """
        values = dict(base if base is not None else self.defaults())
        for name, value in changes.items():
            try:
                values[name] = self.check_param(name, value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return RenderParams(values)

    def with_defaults(self, defaults: Mapping[str, Any]) -> "FamilySpec":
        """The same family with other defaults (a model file may carry its own, as the tiny models do)."""
        specs = []
        for spec in self.param_specs:
            if spec.name in defaults:
                try:
                    spec = replace(spec, default=spec.check(defaults[spec.name]))
                except ValueError as exc:
                    raise ValueError(f"default {spec.name}: {exc}") from None
            specs.append(spec)
        unknown = sorted(set(defaults) - set(self._by_name))
        if unknown:
            raise ValueError(f"defaults for parameters the {self.title} family does not have: {unknown}")
        return replace(self, param_specs=tuple(specs))
