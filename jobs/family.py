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

# What an input names: one image file, one video file, an ordered list of image files, or an
# ordered list of LoRA files, each with its strength ("PATH[:STRENGTH]").
InputKind = Literal["image", "video", "images", "loras"]
INPUT_KINDS: tuple[InputKind, ...] = ("image", "video", "images", "loras")
_FILE_KIND: dict[str, FileKind] = {"image": "image", "video": "video", "images": "image", "loras": "lora"}
_WHAT = {"image": "an image", "video": "a video", "images": "one or more images",
         "loras": "LoRA files (PATH[:STRENGTH])"}
DEFAULT_LORA_SLOTS = ("loras",)  # one DiT: one LoRA set; the A14B families have "loras_high", "loras_low"


def lora_pair(name: str, k: int, item: Any) -> tuple[str, float]:
    """Element k of LoRA input `name` as (path, strength), from "PATH[:STRENGTH]" or a pair; ValueError naming it."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        path, strength = item
        if isinstance(path, str) and path.strip() and isinstance(strength, (int, float)) \
                and not isinstance(strength, bool) and abs(float(strength)) != float("inf") and strength == strength:
            return path, float(strength) + 0.0
        raise ValueError(f"input {name}: element {k}: must be (path, finite strength), got {item!r:.80}")
    try:
        return parse_lora_ref(item)
    except ValueError as exc:
        raise ValueError(f"input {name}: element {k}: {exc}") from None


def parse_lora_ref(text: str) -> tuple[str, float]:
    """"PATH[:STRENGTH]" -> (path, strength); strength 1.0 when omitted. The text after the last ':'
    is a strength only when it reads as a finite number, so `s3://b/x.safetensors` and `C:/x` are paths."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"must be PATH[:STRENGTH], got {text!r:.80}")
    text = text.strip()
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return text, 1.0
        if strength != strength or strength in (float("inf"), float("-inf")):
            raise ValueError(f"{text!r:.80}: the strength must be a finite number")
        return path, strength + 0.0
    return text, 1.0


@dataclass(frozen=True)
class InputSpec:
    """A conditioning input: a manifest column (and `reelray render` flag) naming a file, or a list of files.

    `needs` names another input of the family that must be given whenever this
    one is (a mask video means nothing without its control video). `same_size_as`
    names another video input whose frame count and size this video must have
    (a mask frame for each control frame), checked from the files' headers
    when the manifest is read.
    """

    name: str  # the manifest column, e.g. "image"
    kind: InputKind
    required: bool
    help: str = ""
    needs: str | None = None
    same_size_as: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input {self.name}: kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.needs == self.name or self.same_size_as == self.name:
            raise ValueError(f"input {self.name}: cannot need itself or match its own size")
        if self.same_size_as is not None and self.kind != "video":
            raise ValueError(f"input {self.name}: same_size_as is for video inputs, not {self.kind!r}")

    @property
    def is_list(self) -> bool:
        """True when the input is a list of files (a list<string> manifest column)."""
        return self.kind in ("images", "loras")

    @property
    def file_kind(self) -> FileKind:
        """What each of its files holds: "image" or "video"."""
        return _FILE_KIND[self.kind]

    @property
    def what(self) -> str:
        """The input's kind in words, for messages: "an image", "a video", "one or more images"."""
        return _WHAT[self.kind]


class ParamConflict(ValueError):
    """Parameter values fine alone that disagree (steps and step_list; a width without a height);
    `field` is the parameter the message leads with."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FamilySpec:
    """A family's declaration: render parameters (with defaults and bounds) and inputs."""

    name: str  # "wan2.1-t2v", the value of the dataset's `family` column
    title: str  # "Wan2.1 T2V"
    param_specs: tuple[ParamSpec, ...]
    inputs: tuple[InputSpec, ...] = ()
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # The LoRA inputs, one per DiT the family runs ("loras"; "loras_high" and "loras_low" for an
    # expert pair): each becomes an optional "loras" input of that name.
    lora_slots: tuple[str, ...] = DEFAULT_LORA_SLOTS
    # Width and height 0 mean "by the family's rule" (from the conditioning image's aspect): a job
    # gives both or neither, which params() checks (so a manifest row says so before any render).
    paired_size: bool = False
    _by_name: dict[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        have = {spec.name for spec in self.inputs}
        loras = tuple(InputSpec(slot, "loras", required=False, help="LoRA files applied to "
                                + ("the DiT" if slot == "loras" else f"the {slot.removeprefix('loras_')}-noise expert")
                                + ", in order, each PATH[:STRENGTH] (strength 1.0 when omitted)")
                      for slot in self.lora_slots if slot not in have)
        object.__setattr__(self, "inputs", tuple(self.inputs) + loras)
        by_name = {spec.name: spec for spec in self.param_specs}
        if len(by_name) != len(self.param_specs):
            raise ValueError(f"family {self.name}: duplicate parameter names")
        object.__setattr__(self, "_by_name", by_name)
        names = [spec.name for spec in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name}: duplicate input names")
        if set(names) & set(by_name):
            raise ValueError(f"family {self.name}: {sorted(set(names) & set(by_name))} are both parameters and inputs")
        kinds = {spec.name: spec.kind for spec in self.inputs}
        for spec in self.inputs:
            if spec.needs is not None and spec.needs not in names:
                raise ValueError(f"family {self.name}: input {spec.name} needs {spec.needs!r}, which is not one of its inputs")
            if spec.same_size_as is not None and kinds.get(spec.same_size_as) != "video":
                raise ValueError(f"family {self.name}: input {spec.name} is to match the size of "
                                 f"{spec.same_size_as!r}, which is not one of its video inputs")

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
        is not given. A "loras" input's elements are "PATH[:STRENGTH]" strings or
        (path, strength) pairs, normalised to pairs. Every required input must be
        given, every `needs` met.
        """
        out: dict[str, Any] = {}
        for name, value in inputs.items():
            spec = self.input_spec(name)
            if spec is None:
                raise ValueError(f"the {self.title} family takes no input {name!r} "
                                 f"(its inputs: {', '.join(self.input_names) or 'none'})")
            if spec.is_list:
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, (list, tuple)):
                    raise ValueError(f"input {name}: must be a list of file paths or URIs, got {type(value).__name__}")
                if spec.kind == "loras":
                    values = [lora_pair(name, k, item) for k, item in enumerate(values)]
                for k, item in enumerate(values):
                    if spec.kind != "loras" and (not isinstance(item, str) or not item.strip()):
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
        A `step_list` decides the step count: `steps` becomes its length unless
        `changes` gives steps too, which must then agree with it.
        """
        values = dict(base if base is not None else self.defaults())
        for name, value in changes.items():
            try:
                values[name] = self.check_param(name, value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        step_list = values.get("step_list")
        if step_list is not None and "steps" in values:
            if "steps" in changes and values["steps"] != len(step_list):
                raise ParamConflict("step_list", f"steps {values['steps']} disagrees with step_list of "
                                                 f"{len(step_list)} entries")
            values["steps"] = len(step_list)
        if self.paired_size and bool(values.get("width")) != bool(values.get("height")):
            raise ParamConflict("width" if "width" in changes else "height",
                                f"width {values.get('width')}, height {values.get('height')}: give both, or neither "
                                f"(0: the {self.title} family's size from the image)")
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
        if defaults.get("step_list") is not None:  # a distilled model's own list sets its step count
            try:
                steps = self.params(**{k: defaults[k] for k in ("steps", "step_list") if k in defaults}).steps
            except ValueError as exc:
                raise ValueError(f"defaults: {exc}") from None
            specs = [replace(spec, default=steps) if spec.name == "steps" else spec for spec in specs]
        return replace(self, param_specs=tuple(specs))
