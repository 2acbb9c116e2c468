"""GGUF files mutated from valid ones: only GGUFFormatError (or UnsupportedQuantType) ever escapes.

Two small valid bases (tests/fuzz_cases.py): one written by
`engine.gguf.write_gguf` (a 5-D F32 tensor, every type the engine
dequantizes, I32/F64 that it does not, metadata of the value types gguf-py
writes, an orig_shape key), one by the raw encoder (every scalar value type,
a nested array, alignment 16). Every header field is set to every hostile
value of its kind (counts, string and array lengths, value and element types,
n_dims, dims, GGML types, data offsets, alignment), the file is cut at every
structural boundary, and seeded random flips, windows, insertions, deletions
and garbage are added. Each mutated file is opened, listed, its metadata read
and every tensor dequantized.

The full campaign runs in a child process under RLIMIT_AS (its start-up
address space + 512 MiB) with a per-file time limit and an overall timeout,
so a hang, a giant allocation or a crash is a reported failure. Hypothesis
stacks mutations in this process and bounds what they allocate (tracemalloc).
Wan DiT files that still parse (renamed, reshaped, retyped tensors, bad head
counts) go through `load_dit`, and `reelray inspect` runs on a few mutants.
"""
from __future__ import annotations

import random
import resource
import subprocess
import sys
import tracemalloc
from itertools import count
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.gguf import GGUFFile, GGUFFormatError, UnsupportedQuantType
from engine.wan.dit import HEAD_COUNT_KEY, ModelConfigError, load_dit
from fuzz_cases import (
    assert_allocation_bounded,
    GGUF_ALLOWED,
    GGUF_BASE_METADATA,
    OUTCOMES,
    address_space,
    apply_field_edit,
    dit_base,
    exercise_gguf,
    gguf_base_tensors,
    gguf_crafted,
    gguf_field_edits,
    gguf_map,
    outcome,
    random_mutation,
    run_campaign,
    write_dit,
    write_gguf_bases,
)

REPO = Path(__file__).resolve().parents[1]


class Bases(list):
    """[(path, bytes)] of the two bases, with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"<GGUF bases {[p.name for p, _ in self]}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases((p, p.read_bytes()) for p in write_gguf_bases(tmp_path_factory.mktemp("gguf-bases")))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """The GGUF and DiT campaigns, in one child process (one torch start-up)."""
    report = run_campaign("gguf+dit", tmp_path_factory.mktemp("gguf-campaign"), headroom_mb=512, timeout=240)
    if report.result is not None:
        OUTCOMES.update(report.result.counts)
    return report


class Scratch:
    """Fresh file names for in-process examples (a mapping of an overwritten file would fault)."""

    def __init__(self, directory: Path):
        self.directory, self.numbers = directory, count()

    def write(self, data: bytes, suffix: str = ".gguf") -> Path:
        path = self.directory / f"example{next(self.numbers)}{suffix}"
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("gguf-examples"))


def test_base_files_hold_what_was_written(bases):
    """The harness's anchor: the bases are valid, and exercise_gguf reads every value of them."""
    (first, _), (second, _) = bases
    tensors = gguf_base_tensors()
    with GGUFFile(first) as f:
        assert f.kind == "wan_dit" and f.alignment == 32
        assert f.tensor_names == [n.removeprefix("model.diffusion_model.") for n in tensors]
        assert f.shape("patch_embedding.weight") == (3, 2, 1, 2, 2)
        np.testing.assert_array_equal(f.dequantize("patch_embedding.weight").numpy(),
                                      tensors["model.diffusion_model.patch_embedding.weight"][0])  # F32: exact
        for key, value in GGUF_BASE_METADATA.items():  # the floats are exact in float32
            assert f.metadata[key] == (list(value) if isinstance(value, bytes) else value), key
        for name in ("i32", "f64"):
            with pytest.raises(UnsupportedQuantType, match=name):
                f.dequantize(name)
    with pytest.raises(UnsupportedQuantType):  # the unsupported tensors, after every other one was read
        exercise_gguf(first)
    with GGUFFile(second) as f:
        assert f.alignment == 16 and f.kind == "umt5"
        assert f.metadata["all.nested"] == [[1, -2], [3]] and f.metadata["all.uint64"] == 2**64 - 2
        assert f.shape("enc.blk.0.attn_q.weight") == (2, 1, 1, 2, 2)
    exercise_gguf(second)
    for path, data in bases:  # the field map agrees with the reader
        m = gguf_map(data)
        with GGUFFile(path) as f:
            assert m.data_start == f.data_start
            assert [(t["start"], t["end"]) for t in m.tensors] == [f.byte_range(n) for n in f.tensor_names]


def test_every_structural_and_random_mutation_raises_only_gguf_errors(campaign):
    assert campaign.returncode == 0, (
        f"the child died (status {campaign.returncode}) in case {campaign.last_case!r}:\n{campaign.stderr}")
    result = campaign.result
    print(result.summary("GGUF mutants (child, RLIMIT_AS start-up + 512 MiB)"))
    gguf = [u for u in result.unexpected if not u[0].startswith("dit/")]
    assert not gguf, "\n".join(f"{c}: {label}: {name}: {message}" for c, label, name, message in gguf)
    kinds = {c.removeprefix("role:") for c, _ in result.counts if c.startswith(("gguf/", "role:gguf/"))}
    assert kinds >= {f"gguf/{k}" for k in ("tensor_count", "kv_count", "key_len", "string_len", "value_type",
                                            "array_type", "array_len", "n_dims", "dim", "ggml_type", "data_offset",
                                            "alignment", "truncate", "random", "crafted")}
    # The mutants reach every layer: rejected at parse time, at dequantization, and read whole.
    for name in GGUF_ALLOWED:
        assert result.counts["gguf/random", name] > 0, name
    assert sum(n for (c, _), n in result.counts.items() if c.startswith("gguf/")) > 4000


def test_parseable_dit_mutants_raise_only_model_errors(campaign):
    assert campaign.returncode == 0, f"the child died in case {campaign.last_case!r}:\n{campaign.stderr}"
    result = campaign.result
    assert result.counts["dit/base", "ok"] == 1  # the unmutated DiT loads
    dit = [u for u in result.unexpected if u[0].startswith("dit/")]
    assert not dit, "\n".join(f"{c}: {label}: {name}: {message}" for c, label, name, message in dit)
    for category in ("dit/rename", "dit/reshape", "dit/retype", "dit/metadata"):
        assert result.counts[category, "ModelConfigError"] + result.counts[category, "UnsupportedQuantType"] > 0


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(base=st.integers(0, 1), edit=st.one_of(st.none(), st.integers(0, 10**6)),
       seeds=st.lists(st.integers(0, 2**32 - 1), max_size=3))
def test_stacked_mutations_raise_only_gguf_errors_and_allocate_in_proportion(bases, scratch, base, edit, seeds):
    """A field edit, then up to three random mutations; allocations at most 32x the file + 1 MiB (tracemalloc)."""
    _, data = bases[base]
    header_end = gguf_map(data).data_start
    labels = []
    if edit is not None:
        edits = gguf_field_edits(data)
        _, label, data = apply_field_edit(data, *edits[edit % len(edits)])
        labels.append(label)
    for seed in seeds:
        label, data = random_mutation(data, random.Random(seed), header_end=header_end)
        labels.append(label)
    path = scratch.write(data)
    tracemalloc.start()
    try:
        name, message = outcome(lambda: exercise_gguf(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    OUTCOMES["gguf/hypothesis", name] += 1
    assert name in GGUF_ALLOWED, f"{labels}: {name}: {message}"
    assert_allocation_bounded(peak, len(data), str(labels))


def test_arrays_nested_deeper_than_the_stack_are_a_format_error(tmp_path):
    """A 60 kB file of arrays nested 5000 deep: the reader recursed once per level (RecursionError)."""
    label, data = next((label, data) for _, label, data in gguf_crafted() if "5000 deep" in label)
    path = tmp_path / "nested.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFFormatError, match="nested.gguf"):
        GGUFFile(path)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    state, metadata = dit_base()
    return state, metadata, tmp_path_factory.mktemp("dit")


def test_dit_base_loads(dit):
    state, metadata, directory = dit
    path = directory / "base.gguf"
    write_dit(path, state, metadata)
    model = load_dit(path)
    # F32 tensors are exact; the Q8_0 ffn.2 weight within one quantization step (max|w| / 127 per block).
    np.testing.assert_array_equal(model.patch_embedding.weight.numpy(), state["patch_embedding.weight"])
    w = state["blocks.0.ffn.2.weight"]
    step = np.abs(w.reshape(-1, 32)).max(axis=1).max() / 127
    np.testing.assert_allclose(model.blocks[0].ffn[2].weight.numpy(), w, rtol=0, atol=step)


@pytest.mark.parametrize("head_count", ["two", [2, 2], float("nan")])
def test_load_dit_head_count_of_the_wrong_type_is_a_model_config_error(dit, head_count):
    state, _, directory = dit
    path = directory / "head_count.gguf"
    write_dit(path, state, {HEAD_COUNT_KEY: head_count})
    with pytest.raises(ModelConfigError, match="head_count.gguf"):
        load_dit(path)


def test_load_dit_block_index_far_beyond_the_others_allocates_in_proportion(dit):
    """Two blocks, one named blocks.1000: a model of 1001 blocks must not be planned (it was: hang at 10**8)."""
    state, metadata, directory = dit
    path = directory / "far_block.gguf"
    renamed = {k.replace("blocks.1.self_attn.q.", "blocks.1000.self_attn.q."): v for k, v in state.items()}
    write_dit(path, renamed, metadata)
    tracemalloc.start()
    try:
        name, message = outcome(lambda: load_dit(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert name == "ModelConfigError", message
    size = path.stat().st_size
    assert_allocation_bounded(peak, size, "the crafted file")


def _address_space_limit() -> Callable[[], None]:
    """RLIMIT_AS for a `reelray` child: this process's address space (torch loaded, as in the child) + 512 MiB."""
    limit = address_space() + (512 << 20)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_reelray_inspect_on_mutated_files_prints_one_line_naming_the_file(bases, dit, tmp_path):
    """An unreadable file: exit status 2, one line on stderr naming the file, no traceback (test_cli
    covers plain truncation). A readable GGUF whose DiT config cannot be inferred: exit 0, described
    as far as it goes, the problem named, within the same memory bound."""
    (_, data), _ = bases
    count_field = next(f for f in gguf_map(data).fields if f.kind == "tensor_count")
    paths = {"tensor count 2**63": tmp_path / "huge_count.gguf", "nested arrays": tmp_path / "nested.gguf",
             "DiT head count 'two'": tmp_path / "dit_head_count.gguf",
             "DiT block 10**8": tmp_path / "dit_far_block.gguf"}
    paths["tensor count 2**63"].write_bytes(apply_field_edit(data, count_field, 2**63)[2])
    paths["nested arrays"].write_bytes(next(d for _, label, d in gguf_crafted() if "5000 deep" in label))
    state, metadata, _ = dit
    write_dit(paths["DiT head count 'two'"], state, {HEAD_COUNT_KEY: "two"})
    write_dit(paths["DiT block 10**8"], {k.replace("blocks.1.self_attn.q.", "blocks.99999999.self_attn.q."): v
                                         for k, v in state.items()}, metadata)
    limit = _address_space_limit()
    procs = {case: subprocess.Popen([sys.executable, "-m", "pipeline.cli", "inspect", str(path)], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=limit)
             for case, path in paths.items()}
    failures = []
    for case, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            failures.append(f"{case}: still running after 120 s")
            continue
        lines = err.splitlines()
        if case.startswith("DiT"):
            problem = {"DiT head count 'two'": f"metadata {HEAD_COUNT_KEY!r} = 'two' is not an integer",
                       "DiT block 10**8": "block indices run to 99999999"}[case]
            if not (proc.returncode == 0 and err == "" and out.startswith(str(paths[case]))
                    and "kind          wan_dit" in out and f"problem       {problem}" in out):
                failures.append(f"{case}: exit {proc.returncode}, stdout {out[-600:]!r}, stderr {err[-600:]!r}")
        elif not (proc.returncode == 2 and out == "" and len(lines) == 1 and lines[0].startswith("reelray: error: ")
                  and str(paths[case]) in lines[0] and "Traceback" not in err):
            failures.append(f"{case}: exit {proc.returncode}, stderr {err[-600:]!r}")
        OUTCOMES["cli/inspect", f"exit {proc.returncode}"] += 1
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_long_random_campaign_raises_only_gguf_and_model_errors(tmp_path):
    """`make test-slow`: 20,000 random GGUF mutants and 2,000 random DiT mutants on top of the structured ones."""
    report = run_campaign("gguf+dit", tmp_path, headroom_mb=512, timeout=1800,
                          kwargs={"gguf": {"n_random": 20_000}, "dit": {"n_random": 2_000}})
    assert report.returncode == 0, f"the child died in case {report.last_case!r}:\n{report.stderr}"
    print(report.result.summary("GGUF and DiT mutants, long run"))
    assert not report.result.unexpected, "\n".join(map(str, report.result.unexpected[:50]))
