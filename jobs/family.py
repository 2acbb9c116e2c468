"""What `jobs/` knows of a model family: its name, render parameters and conditioning inputs.

A family (Wan2.1 T2V, Wan2.2 T2V-A14B, ...) lives in `engine/families/`; it
hands the driver this torch-free declaration, and the manifest reader,
`reelray render` and the job identity work from it alone. No family's rules
are written in `jobs/`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from jobs.inputs import FileKind
from jobs.params import DEFAULT_NEGATIVE_PROMPT, ParamSpec, RenderParams

# What an input names: one image file, one video file, or an ordered list of image files.
InputKind = Literal["image", "video", "images"]
INPUT_KINDS: tuple[InputKind, ...] = ("image", "video", "images")
_FILE_KIND: dict[str, FileKind] = {"image": "image", "video": "video", "images": "image"}
_WHAT = {"image": "an image", "video": "a video", "images": "one or more images"}


@dataclass(frozen=True)
class InputSpec:
    """A conditioning input: a manifest column (and `reelray render` flag) naming a file, or a list of files.

    `needs` names another input of the family that must be given whenever this
    one is (a mask video means nothing without its control video).
    """

    name: str  # the manifest column, e.g. "image"
    kind: InputKind
    required: bool
    help: str = ""
    needs: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input {self.name}: kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.needs == self.name:
            raise ValueError(f"input {self.name}: cannot need itself")

    @property
    def is_list(self) -> bool:
        """True when the input is a list of files (a list<string> manifest column)."""
        return self.kind == "images"

    @property
    def file_kind(self) -> FileKind:
        """What each of its files holds: "image" or "video"."""
        return _FILE_KIND[self.kind]

    @property
    def what(self) -> str:
        """The input's kind in words, for messages: "an image", "a video", "one or more images"."""
        return _WHAT[self.kind]


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
        names = [spec.name for spec in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name}: duplicate input names")
        if set(names) & set(by_name):
            raise ValueError(f"family {self.name}: {sorted(set(names) & set(by_name))} are both parameters and inputs")
        for spec in self.inputs:
            if spec.needs is not None and spec.needs not in names:
                raise ValueError(f"family {self.name}: input {spec.name} needs {spec.needs!r}, which is not one of its inputs")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def input_spec(self, name: str) -> InputSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def unmet_needs(self, given: Collection[str]) -> list[InputSpec]:
        """The inputs among `given` whose `needs` is not among `given`, in declaration order."""
        return [spec for spec in self.inputs if spec.needs is not None and spec.name in given and spec.needs not in given]

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, str | list[str]]:
        """`inputs` ({name: path or URI, or a list of them for a list input}) normalised, or ValueError naming the input.

        A list input also takes one string (a one-element list); an empty list
        is not given. Every required input must be given, every `needs` met.
        """
        out: dict[str, str | list[str]] = {}
        for name, value in inputs.items():
            spec = self.input_spec(name)
            if spec is None:
                raise ValueError(f"the {self.title} family takes no input {name!r} "
                                 f"(its inputs: {', '.join(self.input_names) or 'none'})")
            if spec.is_list:
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, (list, tuple)):
                    raise ValueError(f"input {name}: must be a list of file paths or URIs, got {type(value).__name__}")
                for k, item in enumerate(values):
                    if not isinstance(item, str) or not item.strip():
                        raise ValueError(f"input {name}: element {k}: must be a file path or URI, got {item!r:.60}")
                if values:
                    out[name] = list(values)
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(f"input {name}: must be a file path or URI, got {value!r:.60}")
            else:
                out[name] = value
        missing = [spec.name for spec in self.inputs if spec.required and spec.name not in out]
        if missing:
            raise ValueError(f"the {self.title} family needs inputs {missing} (its inputs: {', '.join(self.input_names)})")
        for spec in self.unmet_needs(out):
            raise ValueError(f"input {spec.name} needs input {spec.needs}, which is not given")
        return out

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
