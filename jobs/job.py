"""`RenderJob`: one video to render, its identity, and where it came from."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, field_validator, model_validator

from jobs.identity import SEED_MAX, job_digest
from jobs.params import RenderParams, describe


def check_plain(value: Any, where: str) -> None:
    """ValueError unless `value` is JSON-able plain data (None, str, bool, int, float, lists, str-keyed dicts)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for item in value:
            check_plain(item, where)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            check_plain(item, where)
        return
    raise ValueError(f"passthrough {where!r}: {describe(value)} is not a JSON-able plain value")


class InputRef(BaseModel):
    """A conditioning input file: where the actor reads it, and the content digest the job id holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str  # an absolute local path or a pyarrow filesystem URI
    sha256: str
    strength: float | None = None  # a LoRA's strength; None for every other input


InputValue = InputRef | list[InputRef]  # one file, or an ordered list of files (an "images" input)


def _digest(ref: InputRef) -> str | list:
    return ref.sha256 if ref.strength is None else [ref.sha256, ref.strength]


def _where(ref: InputRef) -> str | tuple[str, float]:
    return ref.uri if ref.strength is None else (ref.uri, ref.strength)


def input_digests(inputs: dict[str, InputValue]) -> dict[str, str | list]:
    """{name: content digest, or the list of its files' digests in order; a LoRA as [digest, strength]}:
    what the job id holds of its inputs."""
    return {name: [_digest(r) for r in ref] if ref.__class__ is list else _digest(ref) for name, ref in inputs.items()}


def input_uris(inputs: dict[str, InputValue]) -> dict[str, str | list]:
    """{name: path or URI, or the list of them in order; a LoRA as (path, strength)}: what the engine reads."""
    return {name: [_where(r) for r in ref] if ref.__class__ is list else _where(ref) for name, ref in inputs.items()}


class RenderJob(BaseModel):
    """One video to render: content, identity, and where it came from.

    Build one with `RenderJob.create` (which computes `job_id`); constructing
    it directly checks that `job_id` matches the content.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    family: str
    model_digest: str
    prompt: str
    negative_prompt: str
    seed: int = Field(strict=True, ge=0, le=SEED_MAX)
    params: InstanceOf[RenderParams]
    inputs: dict[str, InputValue] = Field(default_factory=dict)  # a list input keeps its order
    row: int = Field(default=0, strict=True, ge=0)  # manifest row (global, 0-based)
    passthrough: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("passthrough")
    @classmethod
    def _passthrough_plain(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            check_plain(item, key)
        return value

    @field_validator("inputs")
    @classmethod
    def _lists_not_empty(cls, value: dict[str, InputValue]) -> dict[str, InputValue]:
        for name, ref in value.items():
            if isinstance(ref, list) and not ref:
                raise ValueError(f"input {name}: an empty list (leave the input out instead)")
        return value

    @model_validator(mode="after")
    def _id_matches_content(self) -> "RenderJob":
        expected = job_digest(self.model_digest, self.prompt, self.negative_prompt, self.seed, self.params,
                              self.family, self.input_digests()).hex()
        if self.job_id != expected:
            raise ValueError(f"job_id {self.job_id!r:.80} does not match the job's content ({expected})")
        return self

    def lora_key(self) -> tuple:
        """The job's LoRAs as ((input name, ((sha256, strength), ...)), ...): equal for jobs that render
        with the same LoRA set, () for none."""
        return tuple((name, tuple((r.sha256, r.strength) for r in ref)) for name, ref in sorted(self.inputs.items())
                     if ref.__class__ is list and ref and ref[0].strength is not None)

    def input_digests(self) -> dict[str, str | list[str]]:
        """{name: content digest, or the list of digests of a list input}."""
        return input_digests(self.inputs)

    def input_uris(self) -> dict[str, str | list[str]]:
        """{name: path or URI, or the list of them of a list input}, as `Engine.render` takes them."""
        return input_uris(self.inputs)

    @classmethod
    def create(
        cls,
        *,
        family: str,
        model_digest: str,
        prompt: str,
        seed: int,
        params: RenderParams,
        negative_prompt: str,
        inputs: dict[str, InputValue] | None = None,
        row: int = 0,
        passthrough: dict[str, Any] | None = None,
    ) -> "RenderJob":
        """A job with its id computed."""
        inputs = inputs or {}
        digest = job_digest(model_digest, prompt, negative_prompt, seed, params, family,
                            input_digests(inputs))
        return cls(
            job_id=digest.hex(),
            family=family,
            model_digest=model_digest,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            params=params,
            inputs=inputs,
            row=row,
            passthrough=passthrough or {},
        )
