"""The toy world: one flat shape moving in one direction over a plain background.

A scene is four names (colour, shape, direction, background); its clip is
17 frames of 64x64 RGB at 16 fps in which the shape slides in a straight line
across at least 45% of the frame, always fully inside it. Start position, size
and travel (hence speed) are drawn from a random generator, so a model trained
on the world learns a distribution rather than one clip per prompt.

Held-out scenes: number each list from 0 in the order given here; a scene is
held out of training when colour + shape + direction + background is a
multiple of 10. Every single attribute value still appears in training, only
some combinations do not.

Colours are chosen far apart in RGB, and every shape colour far from every
background colour (at least ~110 apart), so a blurry or noisy render still
classifies by nearest colour.
"""
from dataclasses import dataclass
from functools import cache

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("black", "gray", "brown", "teal")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 215, 30),
    "white": (245, 245, 245),
    "purple": (150, 20, 180),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "brown": (110, 70, 30),
    "teal": (0, 128, 128),
}

FRAMES = 17
SIZE = 64
FPS = 16

# The canonical phrasing first; the others are extra training captions that
# parse_prompt also understands.
TEMPLATES = (
    "a {colour} {shape} moving {direction} on a {background} background",
    "{colour} {shape} on {background}, moving {direction}",
    "a {background} background with a {colour} {shape} moving {direction}",
    "a {shape} in {colour} moves {direction} across a {background} background",
    "{colour} {shape}, {background} background, moving {direction}",
)

# Shape size as a fraction of the frame side, and the share of the frame it
# travels along its direction (the rest of the room is left as jitter). A
# shape 22-28 pixels wide spans three or four of the VAE's 8-pixel latent
# cells: measured, the toy VAE learns to draw it about 10x faster per step
# than a 13-18 pixel one (24 dB after 300 image steps, against 14 dB).
SHAPE_SIZE = (0.34, 0.44)
MIN_TRAVEL = 0.45
MARGIN = 1.0  # pixels kept clear at the frame edge: the shape is always wholly inside
SUPERSAMPLE = 4  # sub-pixel samples per side, for antialiased edges and smooth sub-pixel motion


@dataclass(frozen=True)
class Scene:
    """One combination of the four attributes, named as in the lists above."""

    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self):
        for field, names in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS),
                             ("background", BACKGROUNDS)):
            if getattr(self, field) not in names:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; expected one of {names}")

    @property
    def indices(self) -> tuple[int, int, int, int]:
        """(colour, shape, direction, background) positions in their lists, from 0."""
        return (COLOURS.index(self.colour), SHAPES.index(self.shape),
                DIRECTIONS.index(self.direction), BACKGROUNDS.index(self.background))

    @property
    def held_out(self) -> bool:
        return sum(self.indices) % 10 == 0

    @property
    def prompt(self) -> str:
        return TEMPLATES[0].format(**self.names())

    def names(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "direction": self.direction,
                "background": self.background}


def all_scenes() -> list[Scene]:
    """Every combination, 6 * 3 * 4 * 4 = 288, colour varying slowest."""
    return [Scene(c, s, d, b) for c in COLOURS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS]


def training_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if not scene.held_out]


def held_out_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if scene.held_out]


def phrasings(scene: Scene) -> list[str]:
    """The canonical prompt first, then the alternate captions, in a fixed order."""
    return [template.format(**scene.names()) for template in TEMPLATES]


@cache
def _prompt_table() -> dict[str, Scene]:
    # 288 scenes x 5 phrasings: an exact lookup is simpler and stricter than a grammar.
    return {text: scene for scene in all_scenes() for text in phrasings(scene)}


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt names, in any of the world's phrasings (case and outer spaces ignored)."""
    key = " ".join(str(prompt).lower().split()).rstrip(".")
    try:
        return _prompt_table()[key]
    except KeyError:
        raise ValueError(f"not a toy-world prompt: {prompt!r}") from None


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """Which sample points (x, y) lie in the shape of width and height `side` centred on its box (cx, cy)."""
    half = side / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # Upright isosceles triangle: apex at the top centre, base along the bottom of the box.
    depth = y - (cy - half)
    return (depth >= 0) & (depth <= side) & (np.abs(x - cx) <= depth / 2)


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Fraction of each pixel [size, size] the shape covers, by supersampling around its box only."""
    coverage = np.zeros((size, size), np.float32)
    half = side / 2
    x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)), size)
    y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)), size)
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample centres within a pixel
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    inside = _inside(shape, xs[None, :], ys[:, None], cx, cy, side)
    coverage[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


def render_clip(scene: Scene, rng: np.random.Generator | int = 0, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The scene's clip, uint8 [frames, size, size, 3]; shape size, start and travel drawn from `rng`.

    `rng` is a Generator (used as is) or an integer seed, which is mixed with
    the scene's indices so that one seed gives every scene its own draw.

    The shape moves at constant speed along its direction, covering between 45%
    of the frame and all the room it has; the other coordinate is fixed.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"render_clip needs a Scene, got {type(scene).__name__}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)) or rng < 0:
            raise ValueError(f"rng must be a numpy Generator or a seed >= 0, got {rng!r}")
        # The scene joins the seed, so seed 0 of every scene is a different draw, not the same path.
        rng = np.random.default_rng([int(rng), *scene.indices])

    side = rng.uniform(*SHAPE_SIZE) * size
    low, high = MARGIN + side / 2, size - MARGIN - side / 2  # box-centre range that keeps the shape inside
    travel = rng.uniform(MIN_TRAVEL * size, high - low)
    start = rng.uniform(low, high - travel)
    across = rng.uniform(low, high)
    along = start + travel * np.linspace(0.0, 1.0, frames)
    if scene.direction in ("left", "up"):
        along = low + high - along  # mirror: the same path run the other way

    background = np.array(BACKGROUND_RGB[scene.background], np.float32)
    colour = np.array(COLOUR_RGB[scene.colour], np.float32)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for index, position in enumerate(along):
        cx, cy = (position, across) if scene.direction in ("left", "right") else (across, position)
        alpha = _coverage(scene.shape, cx, cy, side, size)[..., None]
        clip[index] = np.rint(background + alpha * (colour - background))
    return clip
