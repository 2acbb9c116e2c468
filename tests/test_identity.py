"""Job identity: canonical digests, file digests, and file names made only from job ids."""
import hashlib
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.identity import (
    JOB_SCHEMA,
    canonical_json,
    file_digest,
    job_digest,
    job_id,
    job_payload,
    model_digest,
    sidecar_relpath,
    video_relpath,
)
from jobs.params import RenderParams

MODEL = "ab" * 32
PARAMS = RenderParams(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16, sampler="unipc")

texts = st.text(max_size=40)  # any code points but surrogates: control chars, RTL, emoji, quotes
seeds = st.integers(0, 2**63 - 1)
params = st.builds(
    RenderParams,
    width=st.integers(1, 256).map(lambda k: 16 * k),
    height=st.integers(1, 256).map(lambda k: 16 * k),
    frames=st.integers(0, 250).map(lambda k: 4 * k + 1),
    steps=st.integers(1, 1000),
    guidance=st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    shift=st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
    fps=st.integers(1, 240),
    sampler=st.sampled_from(["unipc", "euler"]),
)


def test_job_id_is_64_hex_and_stable():
    a = job_id(MODEL, "a cat", "blurry", 7, PARAMS)
    assert re.fullmatch(r"[0-9a-f]{64}", a)
    assert a == job_id(MODEL, "a cat", "blurry", 7, PARAMS.override())
    # the recipe, spelled out: sha256 of canonical JSON with the schema tag
    expected = hashlib.sha256(
        json.dumps(
            {"schema": JOB_SCHEMA, "model_digest": MODEL, "prompt": "a cat", "negative_prompt": "blurry",
             "seed": 7, "params": PARAMS.model_dump()},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")
    ).hexdigest()
    assert a == expected
    assert JOB_SCHEMA == "reelray.job/1"


def test_equal_numbers_are_one_job():
    five = PARAMS.override(guidance=5)
    assert job_id(MODEL, "p", "n", 0, five) == job_id(MODEL, "p", "n", 0, PARAMS.override(guidance=5.0))
    # -0.0 == 0.0 in Python but not in JSON text: normalised, in either order of first use
    negative_zero, zero = PARAMS.override(guidance=-0.0), PARAMS.override(guidance=0.0)
    assert str(negative_zero.guidance) == "0.0"
    assert job_id(MODEL, "p", "n", 0, negative_zero) == job_id(MODEL, "p", "n", 0, zero)


@settings(max_examples=80)
@given(model=st.text(min_size=1, max_size=70), prompt=texts, negative=texts, seed=seeds, p=params)
def test_hand_written_canonical_json_matches_json_dumps(model, prompt, negative, seed, p):
    payload = job_payload(model, prompt, negative, seed, p)
    assert job_digest(model, prompt, negative, seed, p) == hashlib.sha256(canonical_json(payload)).digest()


@settings(max_examples=80)
@given(
    prompt=texts, negative=texts, seed=seeds, p=params,
    field=st.sampled_from(["model", "prompt", "negative", "seed", *RenderParams.model_fields]),
    data=st.data(),
)
def test_changing_any_field_changes_the_id(prompt, negative, seed, p, field, data):
    base = dict(model_digest=MODEL, prompt=prompt, negative_prompt=negative, seed=seed, params=p)
    before = job_id(**base)
    changed = dict(base)
    if field == "model":
        changed["model_digest"] = MODEL[:-1] + "c"
    elif field == "prompt":
        changed["prompt"] = prompt + data.draw(st.text(min_size=1, max_size=3))
    elif field == "negative":
        changed["negative_prompt"] = negative + " "
    elif field == "seed":
        changed["seed"] = seed ^ 1
    else:
        value = getattr(p, field)
        if field == "sampler":
            new = "euler" if value == "unipc" else "unipc"
        elif field in ("guidance", "shift"):
            new = value + 0.5  # values stay below 1e6, where +0.5 is exact enough to differ
        elif field == "width" or field == "height":
            new = 16 if value != 16 else 32
        elif field == "frames":
            new = 1 if value != 1 else 5
        else:  # steps, fps
            new = 1 if value != 1 else 2
        changed["params"] = p.override(**{field: new})
    assert job_id(**changed) != before
    assert job_id(**base) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "seed must be an integer in 0..2**63-1, got -1"),
        (dict(seed=2**63), "seed must be an integer in 0..2**63-1, got 9223372036854775808"),
        (dict(seed=True), "seed must be an integer in 0..2**63-1, got True"),
        (dict(seed=1.0), "seed must be an integer in 0..2**63-1, got 1.0"),
        (dict(model_digest=""), "model_digest must be a non-empty string"),
        (dict(prompt=None), "prompt and negative_prompt must be strings"),
        (dict(params={"width": 64}), "params must be a RenderParams, got dict"),
    ],
)
def test_job_id_refuses_bad_inputs(kwargs, message):
    args = dict(model_digest=MODEL, prompt="p", negative_prompt="n", seed=0, params=PARAMS) | kwargs
    with pytest.raises(ValueError) as exc:
        job_id(**args)
    assert message in str(exc.value)


def test_paths_come_from_the_job_id_only():
    jid = job_id(MODEL, "../../etc/passwd", "n", 0, PARAMS)
    assert video_relpath(jid) == f"videos/{jid[:2]}/{jid}.mp4"
    assert sidecar_relpath(jid) == f"videos/{jid[:2]}/{jid}.json"


@pytest.mark.parametrize(
    "bad",
    ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 63 + "\n", " " + "a" * 63, None, 12, b"a" * 64],
)
def test_paths_refuse_anything_but_64_lowercase_hex(bad):
    with pytest.raises(ValueError):
        video_relpath(bad)
    with pytest.raises(ValueError):
        sidecar_relpath(bad)


@settings(max_examples=100)
@given(st.text(max_size=80))
def test_random_text_never_becomes_a_path(text):
    if re.fullmatch(r"[0-9a-f]{64}", text):
        assert video_relpath(text).endswith(text + ".mp4")
    else:
        with pytest.raises(ValueError):
            video_relpath(text)


def test_file_digest_streams_across_chunk_boundaries(tmp_path):
    data = os.urandom(1024) * (8 * 1024 + 3)  # 8 MiB + 3 KiB: two chunks
    path = tmp_path / "weights.gguf"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_digest(str(empty)) == hashlib.sha256(b"").hexdigest()


def test_file_digest_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"first")
    first = file_digest(path)
    stat = os.stat(path)
    # Same size and mtime: the cache answers (the documented key), content is not re-read.
    path.write_bytes(b"FIRST")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path) == first
    # A new size is a new key.
    path.write_bytes(b"second!")
    assert file_digest(path) == hashlib.sha256(b"second!").hexdigest()
    # A symlink resolves to the same file.
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    assert file_digest(link) == hashlib.sha256(b"second!").hexdigest()
    with pytest.raises(FileNotFoundError):
        file_digest(tmp_path / "missing")


def test_model_digest_depends_on_roles_and_contents_not_names(tmp_path):
    (tmp_path / "a").write_bytes(b"dit weights")
    (tmp_path / "b").write_bytes(b"vae weights")
    (tmp_path / "c").write_bytes(b"dit weights")  # same bytes as a, other name
    d1 = model_digest({"dit": tmp_path / "a", "vae": tmp_path / "b"})
    assert re.fullmatch(r"[0-9a-f]{64}", d1)
    assert model_digest({"vae": tmp_path / "b", "dit": tmp_path / "a"}) == d1
    assert model_digest({"dit": tmp_path / "c", "vae": tmp_path / "b"}) == d1
    assert model_digest({"dit": tmp_path / "b", "vae": tmp_path / "a"}) != d1
    assert model_digest({"dit": tmp_path / "a"}) != d1
    with pytest.raises(ValueError):
        model_digest({})
