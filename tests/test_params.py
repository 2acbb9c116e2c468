"""Render parameters: the checks every value goes through, the families' declarations, the official defaults."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.families import FAMILIES
from engine.families.wan21_t2v import SPEC as WAN21
from jobs.family import FamilySpec
from jobs.params import DEFAULT_NEGATIVE_PROMPT, ParamSpec

GOOD = dict(width=64, height=48, frames=9, steps=4, guidance=5.0, shift=3.0, fps=16, sampler="euler")


def check_param(name, value):
    return WAN21.check_param(name, value)


def test_default_negative_prompt_is_the_official_137_character_text():
    assert len(DEFAULT_NEGATIVE_PROMPT) == 137
    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert DEFAULT_NEGATIVE_PROMPT.count("，") == 27  # 28 comma-separated phrases
    assert "JPEG压缩残留" in DEFAULT_NEGATIVE_PROMPT.split("，")


def test_wan21_t2v_defaults_are_the_official_ones():
    d = WAN21.defaults()
    assert (d.width, d.height, d.frames, d.steps, d.fps, d.sampler) == (832, 480, 81, 50, 16, "unipc")
    assert (d.guidance, d.shift) == (5.0, 5.0)
    # latent grid of the official 832x480x81 default: (16, 21, 60, 104)
    assert ((d.frames - 1) // 4 + 1, d.height // 8, d.width // 8) == (21, 60, 104)


@pytest.mark.parametrize("name, expected", [
    ("wan2.2-t2v-a14b", dict(width=1280, height=720, frames=81, steps=40, guidance=4.0, guidance_2=3.0,
                             boundary=0.875, shift=12.0, fps=16)),
    ("wan2.2-i2v-a14b", dict(width=0, height=0, frames=81, steps=40, guidance=3.5, guidance_2=3.5,
                             boundary=0.9, shift=5.0, fps=16)),
    ("wan2.2-ti2v-5b", dict(width=0, height=0, frames=121, steps=50, guidance=5.0, shift=5.0, fps=24)),
    ("wan2.1-i2v", dict(width=0, height=0, frames=81, steps=40, guidance=5.0, shift=3.0, fps=16, area=832 * 480)),
])
def test_wan22_defaults_are_the_official_ones(name, expected):
    defaults = FAMILIES[name].spec.defaults()
    assert {k: defaults[k] for k in expected} == expected
    assert defaults.sampler == "unipc"


def test_each_family_declares_its_own_bounds():
    ti2v = FAMILIES["wan2.2-ti2v-5b"].spec
    with pytest.raises(ValueError, match="must be a multiple of 32"):
        ti2v.params(width=48)
    assert ti2v.params(width=1280, height=704).width == 1280
    assert WAN21.params(width=48).width == 48  # Wan2.1 sizes are multiples of 16
    a14b = FAMILIES["wan2.2-t2v-a14b"].spec
    with pytest.raises(ValueError, match=r"boundary: must be <= 1, got 1.5"):
        a14b.params(boundary=1.5)
    with pytest.raises(ValueError, match="the Wan2.1 T2V family has no parameter 'guidance_2'"):
        WAN21.params(guidance_2=3.0)


def test_param_names_are_declared_in_order():
    assert WAN21.param_names == ("width", "height", "frames", "steps", "guidance", "shift", "fps", "sampler",
                                 "step_list")
    assert FAMILIES["wan2.2-t2v-a14b"].spec.param_names[-3:] == ("guidance_2", "boundary", "step_list")


def test_numbers_are_normalised_so_equal_values_are_equal_params():
    a = WAN21.params(**{**GOOD, "guidance": 5, "shift": 3, "steps": 4.0})
    b = WAN21.params(**GOOD)
    assert a == b and hash(a) == hash(b)
    assert type(a.guidance) is float and type(a.steps) is int
    assert a.model_dump() == GOOD | {"step_list": None}  # not given


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("width", 100, "must be a multiple of 16 in 16..4096, got 100"),
        ("width", 0, "must be a multiple of 16 in 16..4096, got 0"),
        ("height", 4112, "must be a multiple of 16 in 16..4096, got 4112"),
        ("width", True, "must be an integer, got bool True"),
        ("frames", 80, "must be 4k+1 (1, 5, 9, ...) in 1..1001, got 80"),
        ("frames", 1005, "must be 4k+1 (1, 5, 9, ...) in 1..1001, got 1005"),
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
        ("sampler", "UniPC", "must be one of 'unipc', 'euler', 'lcm', got str 'UniPC'"),
        ("sampler", 1, "must be one of 'unipc', 'euler', 'lcm', got 1"),
        ("step_list", [250, 0], "must increase strictly, got 250 then 0 (elements 0, 1)"),
        ("step_list", [0, 250, 250], "must increase strictly, got 250 then 250 (elements 1, 2)"),
        ("step_list", [0, 1000], "element 1: must be an integer in 0..999, got 1000"),
        ("step_list", [-1, 5], "element 0: must be an integer in 0..999, got -1"),
        ("step_list", [0, 2.5], "element 1: must be an integer, got 2.5"),
        ("step_list", [0, "250"], "element 1: must be an integer, got str '250'"),
        ("step_list", [True, 5], "element 0: must be an integer, got bool True"),
        ("step_list", [], "must hold at least one integer, got an empty list"),
        ("step_list", "0,250,500", "must be a list of integers, got str '0,250,500'"),
        ("step_list", 250, "must be a list of integers, got 250"),
    ],
)
def test_each_bad_value_is_refused_with_its_reason(name, value, reason):
    with pytest.raises(ValueError) as exc:
        check_param(name, value)
    assert str(exc.value) == reason
    with pytest.raises(ValueError) as exc:
        WAN21.params(**{**GOOD, name: value})
    assert str(exc.value) == f"{name}: {reason}"


@pytest.mark.parametrize(
    "name, value, expected",
    [("width", 16, 16), ("width", 4096, 4096), ("frames", 1, 1), ("frames", 1001, 1001), ("steps", 50.0, 50),
     ("steps", 1000, 1000), ("guidance", 0, 0.0), ("shift", 1e-3, 1e-3), ("fps", 240, 240), ("sampler", "unipc", "unipc"),
     ("sampler", "lcm", "lcm"), ("step_list", [0, 999], (0, 999)), ("step_list", (999,), (999,)),
     ("step_list", [0.0, 250.0], (0, 250)), ("step_list", None, None)],
)
def test_boundary_values_are_accepted(name, value, expected):
    got = check_param(name, value)
    assert got == expected and type(got) is type(expected)


def test_params_are_immutable_and_refuse_unknown_names():
    p = WAN21.params(**GOOD)
    with pytest.raises(AttributeError):
        p.steps = 8
    with pytest.raises(ValueError, match="no parameter 'cfg'"):
        WAN21.params(**GOOD, cfg=3.0)
    with pytest.raises(AttributeError, match="no render parameter 'cfg'"):
        p.cfg


def test_params_from_a_base_are_validated():
    p = WAN21.params(**GOOD)
    q = WAN21.params(p, steps=8, guidance=6)
    assert (q.steps, q.guidance, q.width) == (8, 6.0, 64)
    with pytest.raises(ValueError, match="frames: must be 4k\\+1"):
        WAN21.params(p, frames=8)
    assert math.isclose(WAN21.params(p).guidance, 5.0, rel_tol=0, abs_tol=0)


def test_params_survive_pickling_for_ray():
    import pickle

    p = FAMILIES["wan2.2-t2v-a14b"].spec.defaults()
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.boundary == 0.875 and list(q) == list(p)


def test_a_model_file_may_carry_its_own_defaults_but_not_foreign_ones():
    spec = WAN21.with_defaults({"width": 64, "steps": 4})
    assert (spec.defaults().width, spec.defaults().steps, spec.defaults().height) == (64, 4, 480)
    with pytest.raises(ValueError, match="default width: must be a multiple of 16"):
        WAN21.with_defaults({"width": 65})
    with pytest.raises(ValueError, match="does not have: \\['boundary'\\]"):
        WAN21.with_defaults({"boundary": 0.9})


def test_a_spec_refuses_a_bad_default_and_duplicate_names():
    with pytest.raises(ValueError, match="must be an integer in 1..1000"):
        ParamSpec("steps", "int", 0, low=1, high=1000)
    spec = ParamSpec("steps", "int", 4, low=1, high=1000)
    with pytest.raises(ValueError, match="duplicate"):
        FamilySpec("x", "X", (spec, spec))


def test_jobs_package_imports_neither_torch_nor_ray():
    code = (
        "import sys, jobs, jobs.params, jobs.family, jobs.identity, jobs.manifest, jobs.dataset, jobs.inputs\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.stdout.strip() == ""


# --- step_list: step-distilled sampling --------------------------------------------------


def test_every_family_has_a_step_list_that_is_not_given_by_default():
    for family in FAMILIES.values():
        spec = family.spec
        assert "step_list" in spec.param_names and "lcm" in spec._by_name["sampler"].choices
        assert spec.defaults().step_list is None


def test_a_step_list_is_a_tuple_of_ints_and_sets_steps_to_its_length():
    p = WAN21.params(step_list=[0, 250.0, 500, 750])
    assert p.step_list == (0, 250, 500, 750) and all(type(i) is int for i in p.step_list)
    assert p.steps == 4
    # an equal list in another spelling is the same job's parameters
    same = WAN21.params(step_list=(0, 250, 500, 750))
    assert same == p and hash(same) == hash(p)
    # steps given with it must agree with its length
    assert WAN21.params(steps=4, step_list=[0, 250, 500, 750]) == p
    with pytest.raises(ValueError) as exc:
        WAN21.params(steps=8, step_list=[0, 250, 500, 750])
    assert str(exc.value) == "steps 8 disagrees with step_list of 4 entries"
    # from a base holding a step_list: a new list sets steps again; steps alone must agree
    assert WAN21.params(p, step_list=[0, 500]).steps == 2
    assert WAN21.params(p, guidance=1.0).steps == 4
    with pytest.raises(ValueError, match="steps 3 disagrees with step_list of 4 entries"):
        WAN21.params(p, steps=3)
    # a list dropped (None: not given) keeps the step count it had
    q = WAN21.params(p, step_list=None)
    assert q.step_list is None and q.steps == 4
    # the A14B families too
    a14b = FAMILIES["wan2.2-t2v-a14b"].spec
    assert a14b.params(step_list=[0, 250, 500, 750], sampler="euler").steps == 4


def test_a_step_list_round_trips_through_render_params_pickling_and_a_second_check():
    import pickle

    p = WAN21.params(step_list=[0, 250, 500, 750], sampler="lcm", guidance=1)
    assert pickle.loads(pickle.dumps(p)) == p
    assert WAN21.params(**p) == p  # what Engine.render does with a job's params


def test_a_model_file_may_default_to_a_step_list_which_sets_its_steps():
    spec = WAN21.with_defaults({"step_list": [0, 250, 500, 750], "sampler": "lcm", "guidance": 1.0})
    d = spec.defaults()
    assert (d.step_list, d.steps, d.sampler) == ((0, 250, 500, 750), 4, "lcm")
    assert spec.params(**d) == d  # coherent: Engine.render checks a job's params again
    assert spec.params(step_list=[0, 500]).steps == 2
    assert WAN21.with_defaults({"step_list": [0, 500], "steps": 2}).defaults().steps == 2
    with pytest.raises(ValueError, match="^defaults: steps 8 disagrees with step_list of 2 entries$"):
        WAN21.with_defaults({"step_list": [0, 500], "steps": 8})
    with pytest.raises(ValueError, match="^default step_list: must increase strictly"):
        WAN21.with_defaults({"step_list": [500, 0]})
