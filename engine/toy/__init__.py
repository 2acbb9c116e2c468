"""A synthetic toy world (one shape moving over a plain background) and a pixel-only adherence scorer."""
from engine.toy.world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DIRECTIONS,
    FPS,
    FRAMES,
    SHAPES,
    SIZE,
    Scene,
    all_scenes,
    held_out_scenes,
    parse_prompt,
    phrasings,
    render_clip,
    training_scenes,
)

__all__ = [
    "BACKGROUND_RGB", "BACKGROUNDS", "COLOUR_RGB", "COLOURS", "DIRECTIONS", "FPS", "FRAMES", "SHAPES", "SIZE",
    "Scene", "Score", "accuracy", "all_scenes", "held_out_scenes", "measure", "parse_prompt", "phrasings",
    "predict", "render_clip", "score_clip", "training_scenes",
]

_ADHERENCE = ("Score", "accuracy", "measure", "predict", "score_clip")


def __getattr__(name: str):
    # The scorer is imported on first use, not with the package: `python -m engine.toy.adherence OUT`
    # then runs the module once, as __main__ (runpy warns about a module imported before it runs).
    if name in _ADHERENCE:
        from engine.toy import adherence

        return getattr(adherence, name)
    raise AttributeError(f"module 'engine.toy' has no attribute {name!r}")
