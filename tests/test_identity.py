"""Job identity: canonical digests, file digests, and file names made only from job ids."""
import hashlib
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.families import FAMILIES
from engine.families.wan21_t2v import SPEC as WAN21
from jobs.identity import (
    JOB_SCHEMA,
    canonical_json,
    file_digest,
    job_digest,
    model_digest,
    sidecar_relpath,
    video_relpath,
)
from jobs.manifest import load_jobs

MODEL = "ab" * 32
PARAMS = WAN21.params(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16, sampler="unipc")
A14B = FAMILIES["wan2.2-t2v-a14b"].spec

texts = st.text(max_size=40)  # any code points but surrogates: control chars, RTL, emoji, quotes
seeds = st.integers(0, 2**63 - 1)
params = st.builds(
    WAN21.params,
    width=st.integers(1, 256).map(lambda k: 16 * k),
    height=st.integers(1, 256).map(lambda k: 16 * k),
    frames=st.integers(0, 250).map(lambda k: 4 * k + 1),
    steps=st.integers(1, 1000),
    guidance=st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    shift=st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False),
    fps=st.integers(1, 240),
    sampler=st.sampled_from(["unipc", "euler", "lcm"]),
)
step_lists = st.lists(st.integers(0, 999), min_size=1, max_size=8, unique=True).map(sorted)
# jobs with a step_list too (its length sets steps)
any_params = st.one_of(params, st.builds(lambda p, step_list: WAN21.params(p, step_list=step_list), params, step_lists))


def job_id(model_digest, prompt, negative_prompt, seed, params, family="wan2.1-t2v", inputs=None):
    return job_digest(model_digest, prompt, negative_prompt, seed, params, family, inputs).hex()


def payload(model, prompt, negative, seed, p, family, inputs):
    """The canonical job as the module docstring of jobs/identity.py defines it."""
    given = {name: value for name, value in p.model_dump().items() if value is not None}
    obj = {"schema": JOB_SCHEMA, "model_digest": model, "prompt": prompt, "negative_prompt": negative,
           "seed": seed, "params": given}
    if family != "wan2.1-t2v":
        obj["family"] = family
    if inputs:
        obj["inputs"] = inputs
    return obj


def test_job_id_is_64_hex_and_stable():
    a = job_id(MODEL, "a cat", "blurry", 7, PARAMS)
    assert re.fullmatch(r"[0-9a-f]{64}", a)
    assert a == job_id(MODEL, "a cat", "blurry", 7, WAN21.params(PARAMS))
    # the recipe, spelled out: sha256 of canonical JSON with the schema tag (step_list, not given, is not in it)
    assert PARAMS.step_list is None
    expected = hashlib.sha256(
        json.dumps(
            {"schema": JOB_SCHEMA, "model_digest": MODEL, "prompt": "a cat", "negative_prompt": "blurry",
             "seed": 7, "params": {"width": 64, "height": 64, "frames": 9, "steps": 4, "guidance": 5.0,
                                   "shift": 3.0, "fps": 16, "sampler": "unipc"}},
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")
    ).hexdigest()
    assert a == expected
    assert JOB_SCHEMA == "reelray.job/1"


# Literal ids of Wan2.1 T2V jobs as reelray computed them before model families
# existed (commit 32c2c24), for a fixed model set and manifest. Users resume
# outputs rendered then: these must never change.
PINNED_MODEL_DIGEST = "35f203ce816475ed36d791a409950736f7cfe5ce9076e9f19c60d9d9dc9d4243"
PINNED_IDS = {
    "official": [
        (0, 0, "d1100e04281e4ff26bb3e10b5df0486904b2fc00523fb6be09f49a6123f07a5c"),
        (1, 7, "afab4268d5486f8f48cd06f7b1412f55c0b0c13336991457f63efe96e9ef42d5"),
        (2, 123456789, "cb44234b6ffaacac6770ee5e115e739cfb271fe4dd5dddaea78f0fa305aa1f77"),
        (3, 3, "1c75b308c1e2e46212bbc63c43397a6417ac8b7db5418cff6ed278e2eeefb540"),
        (3, 4, "42e7c06e4f92bfd51e6c3a027367cc5a648d88cd312e64e9c867c86b553a19c7"),
    ],
    "tiny": [
        (0, 0, "9f013a9c406407bc09d8387fb898829cb45467a05e0e299b9c045a16fd0b9cb5"),
        (1, 7, "1bfd16985b00e89bf157aa5343c2e73b0d26cddfce5b30b96789ef9215535535"),
        (2, 123456789, "737bd05f53d7f758ee0857d8ed8e0340a2e1086214c37a4addbb125a03826155"),
        (3, 3, "f3994154d59bbe47153bcd18eb76295c01f413c9b0e38b49c5b56e8be7b22295"),
        (3, 4, "3a493ac31f8879d3dad592b1d5651c48893a5cd0d19b731c1787182ce29cf075"),
    ],
}


def test_wan21_t2v_job_ids_are_pinned(tmp_path):
    files = {}
    for role, content in (("dit", b"dit-bytes"), ("text_encoder", b"umt5-bytes"), ("vae", b"vae-bytes")):
        files[role] = tmp_path / role
        files[role].write_bytes(content)
    digest = model_digest(files)
    assert digest == PINNED_MODEL_DIGEST
    pq.write_table(pa.table({
        "prompt": ["a red fox in snow", "a red fox in snow", "城市夜景", "waves"],
        "negative_prompt": [None, "blurry", None, ""],
        "seed": [0, 7, 123456789, None],
        "steps": [None, 20, None, None],
        "guidance": [None, None, 6.5, None],
        "width": [None, None, None, 1280], "height": [None, None, None, 720],
        "sampler": [None, None, "euler", None],
    }), tmp_path / "m.parquet")
    tiny = WAN21.with_defaults(dict(width=64, height=64, frames=9, steps=4, guidance=5.0, shift=5.0, fps=16))
    for name, spec in (("official", WAN21), ("tiny", tiny)):
        jobs, errors, _ = load_jobs(tmp_path / "m.parquet", model_digest=digest, family=spec, seeds=[3, 4])
        assert not errors
        assert [(j.row, j.seed, j.job_id) for j in jobs] == PINNED_IDS[name]


def test_family_and_inputs_enter_the_id_of_every_other_family():
    a14b = A14B.params(**PARAMS, guidance_2=3.0, boundary=0.875)
    ids = {
        job_id(MODEL, "p", "n", 0, PARAMS),
        job_id(MODEL, "p", "n", 0, PARAMS, family="wan2.2-ti2v-5b"),
        job_id(MODEL, "p", "n", 0, a14b, family="wan2.2-t2v-a14b"),
        job_id(MODEL, "p", "n", 0, A14B.params(a14b, boundary=0.9), family="wan2.2-t2v-a14b"),
        job_id(MODEL, "p", "n", 0, PARAMS, family="wan2.2-ti2v-5b", inputs={"image": "aa" * 32}),
        job_id(MODEL, "p", "n", 0, PARAMS, family="wan2.2-ti2v-5b", inputs={"image": "bb" * 32}),
    }
    assert len(ids) == 6
    assert job_id(MODEL, "p", "n", 0, PARAMS, family="wan2.2-ti2v-5b", inputs={}) == \
        job_id(MODEL, "p", "n", 0, PARAMS, family="wan2.2-ti2v-5b")


def test_equal_numbers_are_one_job():
    five = WAN21.params(PARAMS, guidance=5)
    assert job_id(MODEL, "p", "n", 0, five) == job_id(MODEL, "p", "n", 0, WAN21.params(PARAMS, guidance=5.0))
    # -0.0 == 0.0 in Python but not in JSON text: normalised, in either order of first use
    negative_zero, zero = WAN21.params(PARAMS, guidance=-0.0), WAN21.params(PARAMS, guidance=0.0)
    assert str(negative_zero.guidance) == "0.0"
    assert job_id(MODEL, "p", "n", 0, negative_zero) == job_id(MODEL, "p", "n", 0, zero)


@settings(max_examples=80)
@given(model=st.text(min_size=1, max_size=70), prompt=texts, negative=texts, seed=seeds, p=any_params,
       family=st.sampled_from(list(FAMILIES)),
       inputs=st.one_of(st.none(), st.dictionaries(
           st.sampled_from(["image", "video", "reference_images"]),
           st.one_of(st.text(max_size=64), st.lists(st.text(max_size=64), max_size=4)))))
def test_hand_written_canonical_json_matches_json_dumps(model, prompt, negative, seed, p, family, inputs):
    expected = hashlib.sha256(canonical_json(payload(model, prompt, negative, seed, p, family, inputs))).digest()
    assert job_digest(model, prompt, negative, seed, p, family, inputs) == expected


@settings(max_examples=80)
@given(
    prompt=texts, negative=texts, seed=seeds, p=params,
    field=st.sampled_from(["model", "prompt", "negative", "seed", *WAN21.param_names]),
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
        elif field == "step_list":  # p has none: giving one (of any length) is another job
            new = data.draw(step_lists)
        elif field in ("guidance", "shift"):
            new = value + 0.5  # values stay below 1e6, where +0.5 is exact enough to differ
        elif field == "width" or field == "height":
            new = 16 if value != 16 else 32
        elif field == "frames":
            new = 1 if value != 1 else 5
        else:  # steps, fps
            new = 1 if value != 1 else 2
        changed["params"] = WAN21.params(p, **{field: new})
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
        (dict(family=""), "family must be a non-empty string"),
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


def test_list_inputs_enter_the_id_as_the_ordered_list_of_their_digests():
    a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
    family = "test-mixed"

    def ref_id(*digests, **others):
        return job_id(MODEL, "p", "n", 0, PARAMS, family=family, inputs={"reference_images": list(digests), **others})

    ids = [ref_id(a, b), ref_id(b, a), ref_id(a, c), ref_id(a), ref_id(a, b, b), ref_id(a, b, control_video=c)]
    assert len(set(ids)) == len(ids)  # content, order, count and other inputs all count
    assert ref_id(a, b) == job_id(MODEL, "p", "n", 0, PARAMS, family=family, inputs={"reference_images": (a, b)})
    # the recipe, spelled out: the list sits in `inputs` as a JSON array
    expected = hashlib.sha256(canonical_json(payload(MODEL, "p", "n", 0, PARAMS, family,
                                                     {"reference_images": [a, b]}))).hexdigest()
    assert ref_id(a, b) == expected
    assert b'"inputs":{"reference_images":["' + a.encode() in canonical_json(
        payload(MODEL, "p", "n", 0, PARAMS, family, {"reference_images": [a, b]}))
    # a one-file input and a one-element list are different values (a family declares which one an input is)
    assert ref_id(a) != job_id(MODEL, "p", "n", 0, PARAMS, family=family, inputs={"reference_images": a})


def test_render_job_with_list_inputs_checks_its_id_and_round_trips():
    from jobs.job import InputRef, RenderJob

    refs = [InputRef(uri="/data/r2.png", sha256="bb" * 32), InputRef(uri="/data/r1.png", sha256="aa" * 32)]
    video = InputRef(uri="s3://bucket/ctl.mp4", sha256="cc" * 32)
    job = RenderJob.create(family="test-mixed", model_digest=MODEL, prompt="p", seed=1, params=PARAMS,
                           negative_prompt="n", inputs={"reference_images": refs, "control_video": video})
    assert job.input_digests() == {"reference_images": ["bb" * 32, "aa" * 32], "control_video": "cc" * 32}
    assert job.input_uris() == {"reference_images": ["/data/r2.png", "/data/r1.png"],
                                "control_video": "s3://bucket/ctl.mp4"}
    assert job.job_id == job_id(MODEL, "p", "n", 1, PARAMS, family="test-mixed", inputs=job.input_digests())
    dumped = job.model_dump()
    assert dumped["inputs"]["reference_images"] == [r.model_dump() for r in refs]
    assert RenderJob.model_validate(dumped) == job
    # the same files in another order, or another file's content, is another job: a stale id is refused
    for inputs in ({"reference_images": refs[::-1], "control_video": video},
                   {"reference_images": [refs[0], InputRef(uri="/data/r1.png", sha256="dd" * 32)], "control_video": video}):
        with pytest.raises(ValueError, match="does not match the job's content"):
            RenderJob(**(dumped | {"inputs": inputs}))
    with pytest.raises(ValueError, match="input reference_images: an empty list"):
        RenderJob.create(family="test-mixed", model_digest=MODEL, prompt="p", seed=1, params=PARAMS,
                         negative_prompt="n", inputs={"reference_images": []})


def test_a_step_list_enters_the_id_and_a_missing_one_leaves_it_as_before():
    distilled = WAN21.params(PARAMS, step_list=[0, 250, 500, 750], sampler="euler")
    plain = WAN21.params(PARAMS, sampler="euler")
    assert distilled.steps == plain.steps == 4
    assert job_id(MODEL, "p", "n", 0, distilled) != job_id(MODEL, "p", "n", 0, plain)
    other_list = WAN21.params(distilled, step_list=[0, 250, 500, 751])
    same_list = WAN21.params(distilled, step_list=(0, 250, 500, 750.0))
    assert job_id(MODEL, "p", "n", 0, distilled) != job_id(MODEL, "p", "n", 0, other_list)
    assert job_id(MODEL, "p", "n", 0, distilled) == job_id(MODEL, "p", "n", 0, same_list)
    text = canonical_json(payload(MODEL, "p", "n", 0, distilled, "wan2.1-t2v", None))
    assert b'"step_list":[0,250,500,750]' in text
    assert b"step_list" not in canonical_json(payload(MODEL, "p", "n", 0, plain, "wan2.1-t2v", None))
    assert job_digest(MODEL, "p", "n", 0, distilled, "wan2.1-t2v") == hashlib.sha256(text).digest()
    # every family: a job without a step_list has the id it had before the parameter existed
    from jobs.params import RenderParams

    for family in FAMILIES.values():
        now = family.spec.defaults()
        before = RenderParams({name: value for name, value in now.items() if name != "step_list"})
        assert "step_list" in now and "step_list" not in before
        name = family.spec.name
        assert job_digest(MODEL, "p", "n", 0, now, name) == job_digest(MODEL, "p", "n", 0, before, name)
