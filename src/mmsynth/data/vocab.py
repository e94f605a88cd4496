"""The closed vocabulary of the Shapes world: shapes, colours, sizes, backgrounds, relations.

Everything else (scene sampling, captions, the judge) reads these tables, so changing the world
is a change in one place. Colours are at least 39 CIELab units apart; backgrounds are nearly
achromatic (chroma <= 8), objects chromatic (chroma >= ~30; cyan is the weakest), so they never collide.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}

# Base sRGB value of each colour class; renders jitter around it in CIELab (a class, not one RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 220, 30),
    "green": (30, 165, 55),
    "cyan": (0, 200, 220),
    "blue": (30, 90, 230),
    "purple": (140, 30, 160),
    "pink": (245, 105, 190),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Shade variation: uniform jitter in CIELab around the base colour.
SHADE_JITTER_LAB: tuple[float, float, float] = (6.0, 5.0, 5.0)

SIZES: tuple[str, ...] = ("small", "large")
# Circumradius as a fraction of the image width (every shape fits a circle of this radius).
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.11, 0.13), "large": (0.18, 0.21)}

# Background bands: (L range) in CIELab, with chroma at most BACKGROUND_MAX_CHROMA.
BACKGROUND_KINDS: tuple[str, ...] = ("light", "dark", "gradient", "texture")
BACKGROUND_L: dict[str, tuple[float, float]] = {"light": (82.0, 96.0), "dark": (10.0, 26.0)}
BACKGROUND_MAX_CHROMA: float = 8.0
TEXTURE_AMPLITUDE_L: float = 4.0

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

# Colour-shape combinations that never appear in the train/val/test splits; the `heldout`
# split puts at least one in every scene (compositional generalisation test).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "cross"),
        ("yellow", "circle"),
        ("green", "square"),
        ("cyan", "triangle"),
        ("blue", "cross"),
        ("purple", "circle"),
        ("pink", "star"),
    }
)

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
MAX_OBJECTS: int = 4
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
