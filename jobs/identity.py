"""Job identity: content digests that name jobs, their files, and model sets.

A job id is the sha256 of the canonical JSON of everything that decides a
job's frames: the family, the model set's digest, the prompt, the negative
prompt, the seed, every render parameter given (a parameter whose value is
None, not given, is left out) and the content digest of every
conditioning input, tagged with a schema version (`JOB_SCHEMA`) so that
a future change of the recipe cannot collide with today's ids. Canonical JSON:
sorted keys, no whitespace, UTF-8 without ASCII escaping, floats written by
Python's shortest round-trip `repr`. Parameters are normalised by their
family's `ParamSpec`s first, so `guidance=5` and `guidance=5.0` are the same job.

File names come only from job ids (64 lowercase hex digits), never from
prompts: `video_relpath` refuses anything else.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from jobs.params import RenderParams

JOB_SCHEMA = "reelray.job/1"
MODEL_SCHEMA = "reelray.model/1"
SEED_MAX = 2**63 - 1  # seeds are stored as int64 in the output dataset

_JOB_ID = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 * 1024 * 1024


def canonical_json(obj: Any, *, allow_nan: bool = False) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (no ASCII escaping)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan
    ).encode("utf-8")


# The string encoder json.dumps uses with ensure_ascii=False (C implementation).
_json_str = json.encoder.encode_basestring


@functools.lru_cache(maxsize=4096)
def _params_json(params: RenderParams) -> str:
    # RenderParams is immutable and hashable; a manifest has few distinct ones.
    # A parameter not given (None: a step_list of a job that has none) is left out, so a
    # parameter added later keeps the ids of every job that does not use it.
    return canonical_json({name: value for name, value in params.items() if value is not None}).decode("utf-8")


# Families whose job ids predate the `family` key: Wan2.1 T2V was the only
# family when the first outputs were rendered, and users resume those outputs,
# so its canonical job carries no family (tests/test_identity.py pins its ids).
LEGACY_FAMILY = "wan2.1-t2v"
UNTAGGED_FAMILIES = frozenset({LEGACY_FAMILY})


def job_digest(
    model_digest: str,
    prompt: str,
    negative_prompt: str,
    seed: int,
    params: RenderParams,
    family: str,
    inputs: Mapping[str, str | Sequence[str]] | None = None,
) -> bytes:
    """The 32-byte sha256 behind a job id.

    The canonical job is the JSON object {family, inputs, model_digest,
    negative_prompt, params, prompt, schema, seed} with `inputs` mapping each
    conditioning input's name to its content digest, or a list input's name to
    the list of its files' digests in their order (never paths: the same image
    under another name is the same job; reordered reference images are another).
    `family` is left out for `UNTAGGED_FAMILIES`, and `inputs` when there are none.
    """
    if not isinstance(model_digest, str) or not model_digest:
        raise ValueError(f"model_digest must be a non-empty string, got {model_digest!r:.80}")
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise ValueError("prompt and negative_prompt must be strings")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r:.80}")
    if not isinstance(params, RenderParams):
        raise ValueError(f"params must be a RenderParams, got {type(params).__name__}")
    if not isinstance(family, str) or not family:
        raise ValueError(f"family must be a non-empty string, got {family!r:.80}")
    # The canonical JSON spelled out with its keys in sorted order: a manifest
    # hashes millions of jobs, and this skips the generic encoder.
    # tests/test_identity.py holds it byte-identical to canonical_json.
    head = "" if family in UNTAGGED_FAMILIES else '"family":' + _json_str(family) + ","
    if inputs:
        head += '"inputs":' + canonical_json(dict(inputs)).decode("utf-8") + ","
    text = (
        "{" + head + '"model_digest":' + _json_str(model_digest)
        + ',"negative_prompt":' + _json_str(negative_prompt)
        + ',"params":' + _params_json(params)
        + ',"prompt":' + _json_str(prompt)
        + ',"schema":"' + JOB_SCHEMA
        + '","seed":' + str(int(seed)) + "}"
    )
    return hashlib.sha256(text.encode("utf-8")).digest()


def check_job_id(value: Any) -> str:
    """`value` if it is a job id (64 lowercase hex digits), else ValueError."""
    if not isinstance(value, str) or _JOB_ID.fullmatch(value) is None:
        raise ValueError(f"not a job id (64 lowercase hex digits): {value!r:.80}")
    return value


def video_relpath(job_id: str) -> str:
    """Where a job's MP4 lives under the output root: two-hex-digit fan-out keeps folders small."""
    check_job_id(job_id)
    return f"videos/{job_id[:2]}/{job_id}.mp4"


def sidecar_relpath(job_id: str) -> str:
    """The job's sidecar JSON (its commit marker), next to the MP4."""
    check_job_id(job_id)
    return f"videos/{job_id[:2]}/{job_id}.json"


_file_digests: dict[tuple[str, int, int], str] = {}
_file_digests_lock = threading.Lock()


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file's bytes, read in 8 MB chunks.

    Cached in-process by (real path, size, mtime_ns): a 10 GB model file is
    hashed once per process, and a rewritten file (new size or mtime) is hashed again.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _file_digests_lock:
        cached = _file_digests.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(real, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    with _file_digests_lock:
        _file_digests[key] = digest
    return digest


def model_digest(paths: Mapping[str, str | os.PathLike[str]]) -> str:
    """sha256 hex over the sorted (role, file digest) pairs of a model set.

    Roles ("dit", "text_encoder", "vae", ...) are part of the digest, so swapping
    two files between roles gives another model; file names and locations are not.
    """
    if not paths:
        raise ValueError("model_digest needs at least one file")
    pairs = sorted((str(role), file_digest(path)) for role, path in paths.items())
    return hashlib.sha256(canonical_json({"schema": MODEL_SCHEMA, "files": pairs})).hexdigest()
