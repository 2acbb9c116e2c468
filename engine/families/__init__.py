"""The model families reelray renders: one module each, listed in `FAMILIES`.

Adding a family: write its module (a `FamilySpec`, its file roles and
recogniser, its pipeline with the denoising loop written out) and add it to
this table. Nothing in `jobs/`, `pipeline/` or the other families changes.
"""
from __future__ import annotations

from engine.families import (wan21_i2v, wan21_t2v, wan21_vace, wan22_i2v_a14b, wan22_t2v_a14b, wan22_ti2v_5b,
                              wan22_vace_fun_a14b)
from engine.families.base import Family, ModelSetError, RenderError

FAMILIES: dict[str, Family] = {
    family.spec.name: family
    for family in (
        wan21_t2v.FAMILY,
        wan21_i2v.FAMILY,
        wan22_t2v_a14b.FAMILY,
        wan22_i2v_a14b.FAMILY,
        wan22_ti2v_5b.FAMILY,
        wan21_vace.FAMILY,
        wan22_vace_fun_a14b.FAMILY,
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelSetError(f"unknown family {name!r}; reelray renders: {', '.join(FAMILIES)}") from None


def foreign_names(family: Family) -> frozenset[str]:
    """Parameters and inputs that other families have and `family` does not: a manifest
    column with one of these names is an error for `family`, not passthrough."""
    names = {name for other in FAMILIES.values() for name in (*other.spec.param_names, *other.spec.input_names)}
    return frozenset(names - set(family.spec.param_names) - set(family.spec.input_names))


__all__ = ["FAMILIES", "Family", "ModelSetError", "RenderError", "foreign_names", "get_family"]
