"""Manifest rows: the Python values of one row in, a valid `RowSpec` or the row's `RowError`s out.

Which columns a row may have comes from the family (`jobs.family.FamilySpec`):
its render parameters override the family's defaults per row, its inputs name
files (relative paths are taken from the manifest file's folder), and the
parameters and inputs of other families are errors when given.

An "image" or "video" input is a string cell; an "images" input is a
list<string> cell (one string is taken as a one-element list), whose order is
kept. A null cell, or an empty list, does not give the input.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.columns import Converter, UnreadableCell
from jobs.family import FamilySpec, parse_lora_ref
from jobs.identity import SEED_MAX
from jobs.params import RenderParams, as_integer, describe
from jobs.seeds import MAX_SEED_COUNT, check_seed
from jobs.sources import SourceFile

SEED_COLUMNS = ("seed", "seeds", "seed_start", "seed_count")


@dataclass(frozen=True)
class RowError:
    """A bad field of a manifest row."""

    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.field}: {self.reason}"


@dataclass(slots=True)
class RowSpec:
    """A valid row, before seed expansion."""

    row: int
    prompt: str
    negative_prompt: str
    params: RenderParams
    seeds: Sequence[int]
    inputs: dict[str, str | list[str]]  # input name -> absolute path or URI, or a list of them (hashed later, per batch)
    passthrough: dict[str, Any]


_MISS = object()
_MEMO_MAX = 65536


def _checked(memo: dict, check: Callable[[Any], Any], value: Any) -> tuple[bool, Any]:
    """(True, normalised value) or (False, reason), remembered per distinct (type, value).

    A column of a million rows usually holds a few distinct values; the type is
    part of the key because True == 1 and 50.0 == 50 in Python.
    """
    key = (value.__class__, value)
    try:
        hit = memo.get(key, _MISS)
    except TypeError:  # unhashable (a list or struct cell): nothing to remember
        key, hit = None, _MISS
    if hit is _MISS:
        try:
            hit = (True, check(value))
        except ValueError as exc:
            hit = (False, str(exc))
        if key is not None:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = hit
    return hit


def _file_reason(ref: Any) -> str:
    return f"must be a file path or URI, got {describe(ref)}"


def _prompt_reason(prompt: Any) -> str:
    if prompt is None:
        return "is missing (null)"
    if not isinstance(prompt, str):
        return f"must be a string, got {describe(prompt)}"
    return "must not be empty"


class RowParser:
    """Turns the Python values of manifest rows into `RowSpec`s or their `RowError`s, for one family.

    `foreign` names the parameters and inputs of the other families: a row
    giving one of them (a non-null cell) is an error, never silently ignored.
    """

    def __init__(self, family: FamilySpec, seeds: Sequence[int] | None, foreign: frozenset[str] = frozenset(),
                 input_defaults: Mapping[str, Sequence[Any]] | None = None):
        if not isinstance(family, FamilySpec):
            raise TypeError(f"family must be a FamilySpec, got {type(family).__name__}")
        self.family = family
        # What a list input is when a row's cell is null or the column is absent (`reelray run --lora`):
        # checked once here; an empty list in a cell still means none.
        self.input_defaults = {name: family.check_inputs({name: value}).get(name)
                               for name, value in (input_defaults or {}).items()}
        for name in self.input_defaults:
            if not family.input_spec(name).is_list:
                raise ValueError(f"input {name}: only list inputs take a run-wide default")
        self.defaults = family.defaults()
        if seeds is None:
            self.default_seeds: Sequence[int] = (0,)
        else:
            self.default_seeds = tuple(check_seed(s) for s in seeds)
            if not self.default_seeds:
                raise ValueError("seeds must not be empty (None means seed 0)")
        self.foreign = frozenset(foreign) - set(family.param_names) - set(family.input_names)
        self.known = frozenset(("prompt", "negative_prompt", *SEED_COLUMNS, *family.param_names,
                                *family.input_names, *self.foreign))
        self._needs = tuple(spec for spec in family.inputs if spec.needs is not None)
        self._checks = {name: functools.partial(family.check_param, name) for name in family.param_names}
        self._memos: dict[str, dict] = {name: {} for name in family.param_names}
        # Most manifests use a handful of parameter combinations: build each RenderParams once.
        self._params: dict[tuple, RenderParams] = {(): self.defaults}

    @staticmethod
    def _loras(row: int, name: str, items: list, resolve, resolved: dict, errors: list) -> list | None:
        """A "loras" cell's elements as [(resolved path, strength)], or None after appending the row's error."""
        out = []
        for k, item in enumerate(items):
            try:
                path, strength = parse_lora_ref(item)
            except ValueError as exc:
                errors.append(RowError(row, name, f"element {k}: {exc}"))
                return None
            found = resolved.get(path)
            if found is None:
                found = resolved[path] = resolve(path)
            out.append((found, strength))
        return out

    def _params_for(self, overrides: tuple[tuple[str, Any], ...]) -> RenderParams:
        params = self._params.get(overrides)
        if params is None:
            if len(self._params) >= 4096:
                self._params = {(): self.defaults}
            # Through the family's `params` (the values are checked already): it settles
            # `steps` from a `step_list`, as for `reelray render`.
            params = self._params[overrides] = self.family.params(self.defaults, **dict(overrides))
        return params

    def parse_batch(
        self,
        first: int,
        n: int,
        cols: dict[str, list],
        extra: list[tuple[str, Converter, list]],
        file: SourceFile,
    ) -> list[RowSpec | list[RowError]]:
        """Rows first..first+n-1 (of manifest `file`) from their column values; one entry per row, in order."""
        family = self.family
        default_negative = family.negative_prompt
        prompts = cols["prompt"]
        negatives = cols.get("negative_prompt")
        param_cols = [(name, cols[name], self._memos[name]) for name in family.param_names if name in cols]
        input_cols = [(spec, cols.get(spec.name), spec.is_list, spec.kind == "loras", self.input_defaults.get(spec.name))
                      for spec in family.inputs if spec.required or spec.name in cols or spec.name in self.input_defaults]
        needs = [spec for spec in self._needs if spec.name in cols]
        resolve = file.resolve
        resolved: dict[str, str] = {}  # this batch's input paths, as written -> resolved (rows often repeat one)
        foreign_cols = [(name, cols[name]) for name in sorted(self.foreign) if name in cols]
        seed_cols = [cols.get(name) for name in SEED_COLUMNS]
        any_seed_col = any(c is not None for c in seed_cols)
        out: list[RowSpec | list[RowError]] = []
        for j in range(n):
            row = first + j
            errors: list[RowError] = []

            prompt = prompts[j]
            if prompt.__class__ is not str or not prompt.strip():
                errors.append(RowError(row, "prompt", _prompt_reason(prompt)))

            negative = default_negative if negatives is None else negatives[j]
            if negative is None:
                negative = default_negative
            elif not isinstance(negative, str):
                errors.append(RowError(row, "negative_prompt", f"must be a string, got {describe(negative)}"))
            elif not negative.strip():
                negative = default_negative

            overrides = []
            for name, values, memo in param_cols:
                value = values[j]
                if value is None:
                    continue
                ok, result = _checked(memo, self._checks[name], value)
                if ok:
                    overrides.append((name, result))
                else:
                    errors.append(RowError(row, name, result))

            inputs = {}
            given = set() if needs else None  # names given (well or badly), for the `needs` check
            for spec, values, is_list, is_lora, default in input_cols:
                ref = None if values is None else values[j]
                if ref is None and default is not None:
                    inputs[spec.name] = default
                    ref = default
                elif is_lora and ref.__class__ in (str, list) and ref:
                    loras = self._loras(row, spec.name, [ref] if ref.__class__ is str else ref, resolve, resolved, errors)
                    if loras is not None:
                        inputs[spec.name] = loras
                elif ref.__class__ is str:
                    ref = ref.strip()
                    if not ref:
                        errors.append(RowError(row, spec.name, _file_reason(values[j])))
                    else:
                        path = resolved.get(ref)
                        if path is None:
                            path = resolved[ref] = resolve(ref)
                        inputs[spec.name] = [path] if is_list else path
                elif ref is None or (is_list and ref.__class__ is list and not ref):
                    if spec.required:
                        errors.append(RowError(row, spec.name, f"is missing: the {family.title} family needs {spec.what}"))
                    continue
                elif is_list and ref.__class__ is list:
                    paths = []
                    for k, item in enumerate(ref):
                        if item.__class__ is not str or not item.strip():
                            errors.append(RowError(row, spec.name, f"element {k}: {_file_reason(item)}"))
                            break
                        item = item.strip()
                        path = resolved.get(item)
                        if path is None:
                            path = resolved[item] = resolve(item)
                        paths.append(path)
                    else:
                        inputs[spec.name] = paths
                else:
                    what = "a list of file paths or URIs" if is_list else "a file path or URI"
                    errors.append(RowError(row, spec.name, f"must be {what}, got {describe(ref)}"))
                if given is not None:
                    given.add(spec.name)
            if needs:
                for spec in needs:
                    if spec.name in given and spec.needs not in given:
                        errors.append(RowError(row, spec.name, f"needs {spec.needs}, which this row does not give"))

            for name, values in foreign_cols:
                value = values[j]
                if value is not None and value != []:  # an empty list gives no input, as in its own family
                    errors.append(RowError(row, name, f"the {family.title} family has no {name!r} "
                                                      f"(its parameters: {', '.join(family.param_names)}; "
                                                      f"its inputs: {', '.join(family.input_names) or 'none'})"))

            if any_seed_col:
                seeds = self._seeds(row, [None if c is None else c[j] for c in seed_cols], errors)
            else:
                seeds = self.default_seeds

            passthrough = {}
            for name, conv, values in extra:
                value = values[j]
                if isinstance(value, UnreadableCell):
                    errors.append(RowError(row, name, f"cannot be read: {value.reason}"))
                else:
                    passthrough[name] = conv(value)

            params = None
            if not errors:
                try:
                    params = self._params_for(tuple(overrides))
                except ValueError as exc:  # values fine alone that disagree (ParamConflict): steps and step_list, width alone
                    errors.append(RowError(row, getattr(exc, "field", "params"), str(exc)))
            if errors:
                out.append(errors)
            else:
                out.append(RowSpec(row, prompt, negative, params, seeds, inputs, passthrough))
        return out

    def _seeds(self, row: int, cells: list[Any], errors: list[RowError]) -> Sequence[int]:
        """The seeds of a row from its (seed, seeds, seed_start, seed_count) cells; () after an error."""
        seed, seeds, start, count = cells
        if seed.__class__ is int and seeds is None and start is None and count is None and 0 <= seed <= SEED_MAX:
            return (seed,)  # the common case, checked without a call

        def bad(field: str, reason: str) -> tuple[()]:
            errors.append(RowError(row, field, reason))
            return ()

        given = [
            label
            for label, present in (
                ("seed", seed is not None),
                ("seeds", seeds is not None),
                ("seed_start+seed_count", start is not None or count is not None),
            )
            if present
        ]
        if len(given) > 1:
            return bad("seed", f"give one of seed, seeds, seed_start+seed_count; this row gives {' and '.join(given)}")
        if not given:
            return self.default_seeds
        if seed is not None:
            try:
                return (check_seed(seed),)
            except ValueError as exc:
                return bad("seed", str(exc))
        if seeds is not None:
            if not isinstance(seeds, list):
                return bad("seeds", f"must be a list of integers, got {describe(seeds)}")
            if not seeds:
                return bad("seeds", "must not be empty")
            if len(seeds) > MAX_SEED_COUNT:
                return bad("seeds", f"must hold at most {MAX_SEED_COUNT} seeds, got {len(seeds)}")
            checked = []
            for k, value in enumerate(seeds):
                try:
                    checked.append(check_seed(value))
                except ValueError as exc:
                    return bad("seeds", f"element {k}: {exc}")
            return checked
        if start is None:
            return bad("seed_start", "is missing: seed_count needs seed_start")
        if count is None:
            return bad("seed_count", "is missing: seed_start needs seed_count")
        try:
            start = check_seed(start)
        except ValueError as exc:
            bad("seed_start", str(exc))
            start = None
        try:
            count = as_integer(count)
            if not 1 <= count <= MAX_SEED_COUNT:
                raise ValueError(f"must be an integer in 1..{MAX_SEED_COUNT}, got {describe(count)}")
        except ValueError as exc:
            return bad("seed_count", str(exc))
        if start is None:
            return ()
        if start + count - 1 > SEED_MAX:
            return bad("seed_count", f"the sweep {start}+{count} runs past 2**63-1")
        return range(start, start + count)
