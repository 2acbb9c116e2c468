"""A synthetic toy world (one shape moving over a plain background) and a pixel-only adherence scorer."""
from engine.toy.adherence import Score, accuracy, measure, predict, score_clip
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
