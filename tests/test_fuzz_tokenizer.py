"""Tokenizer metadata mutated from the tiny umT5's: Tokenizer.from_gguf raises only TokenizerError.

The base is the `tokenizer.ggml.*` metadata of the embedded tiny umT5 (600
unigram pieces, byte fallback, a 240 kB NFKC precompiled charsmap), written
as a text-encoder GGUF. Mutations: tokens / scores / token_type of different
lengths, empty, of the wrong element types, scalars or nested arrays; each
key missing; eos / pad / unk ids out of range or mistyped; token types out of
range or inconsistent; duplicate, empty and huge pieces; non-finite scores;
absurd add_space_prefix types; and the charsmap (a blob sentencepiece parses
in C++) cut, flipped, replaced by garbage or mistyped. Only TokenizerError
(or GGUFFormatError from the reader) may escape, and a tokenizer that loads
must encode prompts into valid ids ending in EOS.

A bad blob could abort the process inside sentencepiece, so the whole
campaign runs in a child process whose exit status is checked; hypothesis
mutates the non-blob metadata in this process.
"""
from __future__ import annotations

import math
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from gguf import GGUFValueType as V
from hypothesis import strategies as st
from sentencepiece import SentencePieceProcessor

from engine.gguf import GGUFFile, write_gguf
from engine.wan.convert.t5 import train_tiny_tokenizer
from engine.wan.tokenizer import Tokenizer, TokenizerError
from fuzz_cases import (
    OUTCOMES,
    PROMPTS,
    TOKENIZER_ALLOWED,
    TOKENIZER_KEY,
    RawValue,
    exercise_tokenizer,
    outcome,
    run_campaign,
    tokenizer_base_metadata,
    write_tokenizer_gguf,
)

K = TOKENIZER_KEY


class Metadata(dict):
    """The base metadata, with a short repr (hypothesis prints its arguments when an example fails)."""

    def __repr__(self) -> str:
        return f"<tiny umT5 tokenizer metadata, {len(self[K + 'tokens'])} tokens>"


@pytest.fixture(scope="module")
def base_metadata() -> Metadata:
    return Metadata(tokenizer_base_metadata())


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    report = run_campaign("tokenizer", tmp_path_factory.mktemp("tokenizer-campaign"), headroom_mb=512, timeout=240)
    if report.result is not None:
        OUTCOMES.update(report.result.counts)
    return report


def test_raw_encoder_writes_the_bytes_write_gguf_writes(base_metadata, tmp_path):
    """The cases are written by the raw encoder (fast on the charsmap, and it writes what gguf-py refuses)."""
    write_gguf(tmp_path / "write_gguf.gguf", "t5encoder", {}, base_metadata)
    write_tokenizer_gguf(tmp_path / "raw.gguf", base_metadata)
    assert (tmp_path / "raw.gguf").read_bytes() == (tmp_path / "write_gguf.gguf").read_bytes()


def test_base_tokenizer_encodes_as_its_sentencepiece_model(base_metadata, tmp_path):
    path = tmp_path / "base.gguf"
    write_tokenizer_gguf(path, base_metadata)
    with GGUFFile(path) as f:
        tokenizer = Tokenizer.from_gguf(f)
    reference = SentencePieceProcessor(model_proto=train_tiny_tokenizer())
    text = "A red fox runs across the neon streets of Tokyo; 4K, ultra detailed."
    assert tokenizer.encode(text) == reference.encode(text, out_type=int) + [reference.eos_id()]
    exercise_tokenizer(path)


def test_every_mutation_raises_only_tokenizer_errors_and_never_kills_the_process(campaign):
    assert campaign.returncode == 0, (
        f"the child died (status {campaign.returncode}) in case {campaign.last_case!r}:\n{campaign.stderr}")
    result = campaign.result
    print(result.summary("tokenizer metadata mutants (child, RLIMIT_AS start-up + 512 MiB)"))
    assert result.counts["tok/base", "ok"] == 1
    assert not result.unexpected, "\n".join(f"{c}: {label}: {name}: {message}"
                                            for c, label, name, message in result.unexpected)
    for category in ("tok/lengths", "tok/types", "tok/missing", "tok/special_ids", "tok/values", "tok/charsmap"):
        assert result.counts[category, "TokenizerError"] > 0, category
    # Some blobs pass sentencepiece's checks: the tokenizer then loads and must still encode sanely.
    assert result.counts["tok/charsmap", "ok"] > 0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    directory, numbers = tmp_path_factory.mktemp("tokenizer-examples"), count()

    def write(metadata: dict) -> Path:
        path = directory / f"example{next(numbers)}.gguf"
        write_tokenizer_gguf(path, metadata)
        return path
    return write


scalars = st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(width=32), st.text(max_size=6), st.booleans())
arrays = st.one_of(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=4),
                   st.lists(st.floats(width=32), min_size=1, max_size=4),
                   st.lists(st.text(max_size=3), min_size=1, max_size=4),
                   st.lists(st.booleans(), min_size=1, max_size=4))
KEYS = ("model", "tokens", "scores", "token_type", "eos_token_id", "padding_token_id", "unknown_token_id",
        "add_space_prefix", "remove_extra_whitespaces")


ELEMENTS = {"tokens": st.text(max_size=4), "scores": st.floats(width=32),
            "token_type": st.integers(-(2**31), 2**31 - 1)}


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_metadata_raises_only_tokenizer_errors(base_metadata, scratch, data):
    """A key replaced by any scalar or array, or one element of a list replaced by any value of its type."""
    name = data.draw(st.sampled_from(KEYS), label="key")
    key, value = K + name, base_metadata[K + name]
    if name in ELEMENTS and data.draw(st.booleans(), label="one element"):
        i = data.draw(st.integers(0, len(value) - 1), label="index")
        value = value[:i] + [data.draw(ELEMENTS[name], label="element")] + value[i + 1:]
    else:
        value = data.draw(st.one_of(scalars, arrays), label="value")
    path = scratch({**base_metadata, key: value})
    result, message = outcome(lambda: exercise_tokenizer(path))
    OUTCOMES["tok/hypothesis", result] += 1
    assert result in TOKENIZER_ALLOWED, f"{key} = {value!r:.200}: {result}: {message}"


# --- minimal reproducers of what the campaign found ---------------------------------

def _n(meta: dict) -> int:
    return len(meta[K + "tokens"])


MISTYPED = {
    "tokens as integers": lambda m: {K + "tokens": list(range(_n(m)))},
    "tokens as a scalar": lambda m: {K + "tokens": 5},
    "tokens as arrays of INT32": lambda m: {K + "tokens": RawValue(V.ARRAY, (V.ARRAY, [(V.INT32, [300, -1])] * _n(m)))},
    "scores as words": lambda m: {K + "scores": ["x"] * _n(m)},
    "scores as a scalar": lambda m: {K + "scores": 0.5},
    "token_type as a scalar": lambda m: {K + "token_type": 1},
    "token_type as nested arrays": lambda m: {K + "token_type": RawValue(V.ARRAY, (V.ARRAY, [(V.INT32, [1])] * _n(m)))},
    "eos_token_id NaN": lambda m: {K + "eos_token_id": math.nan},
    "eos_token_id infinite": lambda m: {K + "eos_token_id": math.inf},
    "padding_token_id a list": lambda m: {K + "padding_token_id": [1]},
    "charsmap as INT32 over 255": lambda m: {K + "precompiled_charsmap": RawValue(V.ARRAY, (V.INT32, [300, 1, 2, 3]))},
    "charsmap as a scalar": lambda m: {K + "precompiled_charsmap": 7},
    "charsmap as strings": lambda m: {K + "precompiled_charsmap": RawValue(V.ARRAY, (V.STRING, ["ab", "c"]))},
}


@pytest.mark.parametrize("case", list(MISTYPED))
def test_mistyped_metadata_is_a_tokenizer_error(base_metadata, tmp_path, case):
    path = tmp_path / "mistyped.gguf"
    write_tokenizer_gguf(path, {**base_metadata, **MISTYPED[case](base_metadata)})
    with GGUFFile(path) as f, pytest.raises(TokenizerError, match="mistyped.gguf"):
        Tokenizer.from_gguf(f)


def test_charsmap_as_int8_reads_as_the_same_bytes(base_metadata, tmp_path):
    """llama.cpp accepts an INT8 charsmap (its loader reads INT8 or UINT8): the same bytes, the same tokens."""
    blob = bytes(base_metadata[K + "precompiled_charsmap"])
    as_int8 = RawValue(V.ARRAY, (V.INT8, [b - 256 if b > 127 else b for b in blob]))
    paths = {}
    for name, value in (("uint8", blob), ("int8", as_int8)):
        paths[name] = tmp_path / f"{name}.gguf"
        write_tokenizer_gguf(paths[name], {**base_metadata, K + "precompiled_charsmap": value})
    encoded = {}
    for name, path in paths.items():
        with GGUFFile(path) as f:
            tokenizer = Tokenizer.from_gguf(f)
        encoded[name] = [tokenizer.encode(p) for p in PROMPTS]
    assert encoded["int8"] == encoded["uint8"]


@pytest.mark.slow
def test_long_random_charsmap_campaign_never_kills_the_process(tmp_path):
    """`make test-slow`: 1,000 random charsmap blobs (garbage, flipped tries and strings) through sentencepiece."""
    report = run_campaign("tokenizer", tmp_path, headroom_mb=512, timeout=1800,
                          kwargs={"tokenizer": {"n_random": 1_000}})
    assert report.returncode == 0, f"the child died in case {report.last_case!r}:\n{report.stderr}"
    print(report.result.summary("tokenizer mutants, long run"))
    assert not report.result.unexpected, "\n".join(map(str, report.result.unexpected[:50]))
