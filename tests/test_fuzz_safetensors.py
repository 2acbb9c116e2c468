"""Safetensors files mutated from valid ones: each loader raises only its own error, naming the file.

Bases (tests/fuzz_cases.py): a tiny original-layout Wan2.1 VAE (base_dim 4,
encoder included as real files hold it) and a tiny umT5 encoder in the
Hugging Face layout, both written by `safetensors.torch.save_file`.
Mutations: the header length (zero, short, long, past the file, huge), the
header JSON (invalid, not an object, not UTF-8, deeply nested, duplicate
keys), each of several entries' dtype / shape / data_offsets (unknown,
mistyped, out of range, reversed, overlapping, disagreeing with the bytes),
`__metadata__`, truncation at every boundary, seeded random flips and
garbage; and valid files with the wrong content (tensors reshaped, emptied,
retyped, renamed to far block indices, dropped).

`load_vae` may raise only VAEError, `load_text_encoder` only
TextEncoderError, `engine.model_set.file_role` only ModelSetError; the
safetensors library's own SafetensorError must never come through. The full
campaign runs in a child process under RLIMIT_AS (start-up + 512 MiB) with a
per-file time limit; hypothesis stacks mutations in this process.
"""
from __future__ import annotations

import random
import struct
import tracemalloc
from itertools import chain, count, islice
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model_set import ModelSetError, file_role
from engine.wan.t5 import TextEncoderError, load_text_encoder
from engine.wan.vae import VAEError, load_vae
from fuzz_cases import (
    assert_allocation_bounded,
    FILE_ROLE_ALLOWED,
    OUTCOMES,
    TEXT_ENCODER_ALLOWED,
    UMT5_CHOSEN,
    VAE_ALLOWED,
    VAE_CHOSEN,
    exercise_file_role,
    exercise_text_encoder,
    exercise_vae,
    outcome,
    random_mutation,
    run_campaign,
    safetensors_field_mutations,
    safetensors_join,
    safetensors_split,
    safetensors_truncations,
    umt5_crafted,
    umt5_state_dict,
    vae_crafted,
    vae_state_dict,
    write_safetensors,
)



class Bases(dict):
    """name -> (path, bytes, state dict), with a short repr (hypothesis prints a failing example's arguments)."""

    def __repr__(self) -> str:
        return f"<safetensors bases {sorted(self)}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    directory = tmp_path_factory.mktemp("safetensors-bases")
    out = Bases()
    for name, state in (("vae", vae_state_dict()), ("umt5", umt5_state_dict())):
        path = directory / f"{name}.safetensors"
        write_safetensors(path, state)
        out[name] = (path, path.read_bytes(), state)
    return out


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    report = run_campaign("safetensors", tmp_path_factory.mktemp("safetensors-campaign"), headroom_mb=512, timeout=240)
    if report.result is not None:
        OUTCOMES.update(report.result.counts)
    return report


def test_base_files_load_and_the_header_helpers_round_trip(bases):
    vae_path, vae_data, vae_state = bases["vae"]
    vae = load_vae(vae_path)
    assert vae.config.base_dim == 4 and vae.config.num_res_blocks == 1
    torch.testing.assert_close(vae.state_dict()["decoder.conv1.weight"], vae_state["decoder.conv1.weight"],
                               rtol=0, atol=0)  # float32 in, float32 out: exact
    t5_path, t5_data, t5_state = bases["umt5"]
    encoder = load_text_encoder(t5_path)
    torch.testing.assert_close(encoder.state_dict()["shared.weight"], t5_state["shared.weight"], rtol=0, atol=0)
    assert file_role(vae_path) == "vae" and file_role(t5_path) == "text_encoder"
    for data in (vae_data, t5_data):  # the mutations' header codec writes what save_file writes
        assert safetensors_join(*safetensors_split(data)) == data


def test_every_mutation_raises_only_the_loaders_errors(campaign):
    assert campaign.returncode == 0, (
        f"the child died (status {campaign.returncode}) in case {campaign.last_case!r}:\n{campaign.stderr}")
    result = campaign.result
    print(result.summary("safetensors mutants (child, RLIMIT_AS start-up + 512 MiB)"))
    assert result.counts["vae:base", "ok"] == 1 and result.counts["t5:base", "ok"] == 1
    assert not result.unexpected, "\n".join(f"{c}: {label}: {name}: {message}"
                                            for c, label, name, message in result.unexpected)
    for loader, error in (("vae", "VAEError"), ("t5", "TextEncoderError")):
        for kind in ("header_length", "header_json", "dtype", "shape", "data_offsets", "truncate", "random"):
            assert result.counts[f"{loader}:safetensors/{kind}", error] > 0, (loader, kind)
        for kind in ("reshape", "dtype", "rename", "drop"):
            assert sum(n for (c, _), n in result.counts.items() if c == f"{loader}:state/{kind}") > 0
    assert result.counts["role:safetensors/header_length", "ModelSetError"] > 0


CHOSEN = {"vae": VAE_CHOSEN[:2], "umt5": UMT5_CHOSEN[:2]}


def header_edits(data: bytes, base: str) -> Iterator[tuple[str, str, bytes]]:
    return chain(safetensors_field_mutations(data, CHOSEN[base]), safetensors_truncations(data))


@pytest.fixture(scope="module")
def n_edits(bases) -> dict[str, int]:
    """How many header edits each base has (the edits themselves are rebuilt on demand: 100 kB each)."""
    return {base: sum(1 for _ in header_edits(data, base)) for base, (_, data, _) in bases.items()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    directory, numbers = tmp_path_factory.mktemp("safetensors-examples"), count()

    def write(data: bytes) -> Path:
        path = directory / f"example{next(numbers)}.safetensors"
        path.write_bytes(data)
        return path
    return write


@settings(max_examples=120, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(base=st.sampled_from(["vae", "umt5"]), edit=st.one_of(st.none(), st.integers(0, 10**6)),
       seeds=st.lists(st.integers(0, 2**32 - 1), max_size=2))
def test_stacked_mutations_raise_only_the_loaders_errors(bases, n_edits, scratch, base, edit, seeds):
    """A header edit, then up to two random mutations; allocations at most 32x the file + 1 MiB (tracemalloc)."""
    data = bases[base][1]
    labels = []
    if edit is not None:
        _, label, data = next(islice(header_edits(data, base), edit % n_edits[base], None))
        labels.append(label)
    header_end = 8 + struct.unpack_from("<Q", bases[base][1])[0]
    for seed in seeds:
        label, data = random_mutation(data, random.Random(seed), header_end=header_end)
        labels.append(label)
    path = scratch(data)
    exercise, allowed = (exercise_vae, VAE_ALLOWED) if base == "vae" else (exercise_text_encoder, TEXT_ENCODER_ALLOWED)
    for fn, ok in ((exercise, allowed), (exercise_file_role, FILE_ROLE_ALLOWED)):
        tracemalloc.start()
        try:
            name, message = outcome(lambda: fn(path))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        OUTCOMES[f"{base}/hypothesis", name] += 1
        assert name in ok, f"{fn.__name__}: {labels}: {name}: {message}"
        assert_allocation_bounded(peak, len(data), f"{fn.__name__}: {labels}")


# --- minimal reproducers of what the campaign found ---------------------------------

def test_file_role_of_a_deeply_nested_header_is_a_model_set_error(tmp_path):
    path = tmp_path / "nested.safetensors"
    header = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelSetError, match="nested.safetensors"):
        file_role(path)


@pytest.mark.parametrize("shape", [(16 * 4 * 27,), ()], ids=["flattened", "scalar"])
def test_load_vae_with_a_conv1_of_the_wrong_rank_is_a_vae_error(bases, tmp_path, shape):
    state = dict(bases["vae"][2])
    conv1 = state["decoder.conv1.weight"]
    state["decoder.conv1.weight"] = conv1.reshape(-1)[:1].reshape(()) if shape == () else conv1.reshape(shape)
    path = tmp_path / "conv1.safetensors"
    write_safetensors(path, state)
    with pytest.raises(VAEError, match="conv1.safetensors"):
        load_vae(path)


def test_load_vae_with_stage_widths_of_zero_is_a_vae_error(bases, tmp_path):
    _, _, state = next(c for c in vae_crafted(bases["vae"][2]) if c[1] == "every stage width 0")
    path = tmp_path / "zero_width.safetensors"
    write_safetensors(path, state)
    with pytest.raises(VAEError, match="zero_width.safetensors"):
        load_vae(path)


def test_load_text_encoder_with_zero_heads_is_a_text_encoder_error(bases, tmp_path):
    _, _, state = next(c for c in umt5_crafted(bases["umt5"][2]) if "0 heads" in c[1])
    path = tmp_path / "zero_heads.safetensors"
    write_safetensors(path, state)
    with pytest.raises(TextEncoderError, match="zero_heads.safetensors"):
        load_text_encoder(path)


def _far_vae(state: dict, index: int) -> dict:
    """The first upsampler moved to decoder.upsamples.{index}: it implies index-1 residual blocks per stage."""
    kept = {k: v for k, v in state.items() if not k.startswith(("decoder.upsamples.5.", "decoder.upsamples.8."))}
    return {k.replace("decoder.upsamples.2.", f"decoder.upsamples.{index}.")
             .replace("decoder.upsamples.3.", f"decoder.upsamples.{index + 1}."): v for k, v in kept.items()}


def _far_umt5(state: dict, index: int) -> dict:
    return {k.replace("encoder.block.1.layer.0.SelfAttention.q.", f"encoder.block.{index}.layer.0.SelfAttention.q."): v
            for k, v in state.items()}


@pytest.mark.parametrize("case", ["vae", "vae block 100", "umt5", "umt5 block 100"])
def test_loading_allocates_in_proportion_to_the_file(bases, tmp_path, case):
    """A far block index must be rejected before a model of that many blocks is built (it was: hang at 10**7)."""
    base = case.split()[0]
    state = bases[base][2]
    if case.endswith("100"):
        state = (_far_vae if base == "vae" else _far_umt5)(state, 100)
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    write_safetensors(path, state)
    load, error = (load_vae, VAEError) if base == "vae" else (load_text_encoder, TextEncoderError)
    tracemalloc.start()
    try:
        name, message = outcome(lambda: load(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert name == ("ok" if case == base else error.__name__), message
    size = path.stat().st_size
    assert_allocation_bounded(peak, size, "the crafted file")


@pytest.mark.slow
def test_long_random_campaign_raises_only_the_loaders_errors(tmp_path):
    """`make test-slow`: 5,000 random mutants of each base on top of the structured ones."""
    report = run_campaign("safetensors", tmp_path, headroom_mb=512, timeout=1800,
                          kwargs={"safetensors": {"n_random": 5_000}})
    assert report.returncode == 0, f"the child died in case {report.last_case!r}:\n{report.stderr}"
    print(report.result.summary("safetensors mutants, long run"))
    assert not report.result.unexpected, "\n".join(map(str, report.result.unexpected[:50]))
