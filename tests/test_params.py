"""RenderParams: the checks every render parameter goes through, and the official defaults."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.params import (
    DEFAULT_NEGATIVE_PROMPT,
    PARAM_FIELDS,
    WAN21_T2V_DEFAULTS,
    RenderParams,
    check_param,
)

GOOD = dict(width=64, height=48, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16, sampler="euler")


def test_default_negative_prompt_is_the_official_137_character_text():
    assert len(DEFAULT_NEGATIVE_PROMPT) == 137
    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert DEFAULT_NEGATIVE_PROMPT.count("，") == 27  # 28 comma-separated phrases
    assert "JPEG压缩残留" in DEFAULT_NEGATIVE_PROMPT.split("，")


def test_wan21_t2v_defaults_are_the_official_ones():
    d = WAN21_T2V_DEFAULTS
    assert (d.width, d.height, d.frames, d.steps, d.fps, d.sampler) == (832, 480, 81, 50, 16, "unipc")
    assert (d.guidance, d.shift) == (5.0, 5.0)
    # latent grid of the official 832x480x81 default: (16, 21, 60, 104)
    assert ((d.frames - 1) // 4 + 1, d.height // 8, d.width // 8) == (21, 60, 104)


def test_param_fields_name_every_field_in_order():
    assert PARAM_FIELDS == ("width", "height", "frames", "steps", "guidance", "shift", "fps", "sampler")
    assert tuple(RenderParams.model_fields) == PARAM_FIELDS


def test_numbers_are_normalised_so_equal_values_are_equal_params():
    a = RenderParams(**{**GOOD, "guidance": 5, "shift": 3, "steps": 4.0})
    b = RenderParams(**GOOD)
    assert a == b and hash(a) == hash(b)
    assert type(a.guidance) is float and type(a.steps) is int
    assert a.model_dump() == GOOD


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("width", 100, "must be a multiple of 16 in 16..4096, got 100"),
        ("width", 0, "must be a multiple of 16 in 16..4096, got 0"),
        ("height", 4112, "must be a multiple of 16 in 16..4096, got 4112"),
        ("width", True, "must be an integer, got bool True"),
        ("frames", 80, "must be 4k+1 (1, 5, 9, ..., 81, ...) in 1..1001, got 80"),
        ("frames", 1005, "must be 4k+1 (1, 5, 9, ..., 81, ...) in 1..1001, got 1005"),
        ("steps", -3, "must be an integer in 1..1000, got -3"),
        ("steps", 0, "must be an integer in 1..1000, got 0"),
        ("steps", 50.5, "must be an integer, got 50.5"),
        ("steps", "50", "must be an integer, got str '50'"),
        ("steps", float("nan"), "must be an integer, got nan"),
        ("steps", float("inf"), "must be an integer, got inf"),
        ("steps", None, "must be an integer, got None"),
        ("guidance", -0.5, "must be >= 0, got -0.5"),
        ("guidance", float("nan"), "must be a finite number, got nan"),
        ("guidance", float("-inf"), "must be a finite number, got -inf"),
        ("guidance", False, "must be a number, got bool False"),
        ("shift", 0.0, "must be > 0, got 0.0"),
        ("shift", 10**400, "must be a finite number, got 1000000000000000000000000000000000000..."),
        ("fps", 241, "must be an integer in 1..240, got 241"),
        ("sampler", "UniPC", "must be one of 'unipc', 'euler', got str 'UniPC'"),
        ("sampler", 1, "must be one of 'unipc', 'euler', got 1"),
    ],
)
def test_each_bad_value_is_refused_with_its_reason(name, value, reason):
    with pytest.raises(ValueError) as exc:
        check_param(name, value)
    assert str(exc.value) == reason
    with pytest.raises(ValidationError) as exc:
        RenderParams(**{**GOOD, name: value})
    errors = exc.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == (name,)
    assert reason in str(exc.value)


@pytest.mark.parametrize(
    "name, value, expected",
    [("width", 16, 16), ("width", 4096, 4096), ("frames", 1, 1), ("frames", 1001, 1001), ("steps", 50.0, 50),
     ("steps", 1000, 1000), ("guidance", 0, 0.0), ("shift", 1e-3, 1e-3), ("fps", 240, 240), ("sampler", "unipc", "unipc")],
)
def test_boundary_values_are_accepted(name, value, expected):
    got = check_param(name, value)
    assert got == expected and type(got) is type(expected)


def test_params_are_frozen_and_refuse_unknown_fields():
    p = RenderParams(**GOOD)
    with pytest.raises(ValidationError):
        p.steps = 8
    with pytest.raises(ValidationError) as exc:
        RenderParams(**GOOD, cfg=3.0)
    assert exc.value.errors()[0]["loc"] == ("cfg",)
    with pytest.raises(ValidationError):
        RenderParams(**{k: v for k, v in GOOD.items() if k != "fps"})


def test_override_validates_unlike_model_copy():
    p = RenderParams(**GOOD)
    q = p.override(steps=8, guidance=6)
    assert (q.steps, q.guidance, q.width) == (8, 6.0, 64)
    with pytest.raises(ValidationError):
        p.override(frames=8)
    assert math.isclose(p.override().guidance, 5.0, rel_tol=0, abs_tol=0)


def test_jobs_package_imports_neither_torch_nor_ray():
    code = (
        "import sys, jobs, jobs.params, jobs.identity, jobs.manifest, jobs.dataset\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.stdout.strip() == ""
