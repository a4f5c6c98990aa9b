"""The demo world: captioned 32x32 renders of coloured shapes.

Every image holds one shape in one colour on a plain, low-saturation background. Captions name the shape and/or
the colour with one of several synonyms, so erasing a *concept* (every name of "circle") can be told apart from
erasing a *word*. Rendering is deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")

SHAPE_NAMES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "pyramid"),
    "cross": ("cross", "plus", "plus sign"),
}
COLOUR_NAMES: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "navy"),
    "yellow": ("yellow", "golden", "lemon"),
}

# Base RGB of each colour; renders jitter each channel by up to +-25.
_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 215, 35),
}

FULL_TEMPLATES = (
    "{a} {colour} {shape}",
    "a photo of {a} {colour} {shape}",
    "a picture of {a} {colour} {shape}",
    "an image of {a} {colour} {shape}",
    "{a} {shape} that is {colour}",
    "{a} {colour} {shape} on a plain background",
    "{colour} {shape}",
)
SHAPE_TEMPLATES = ("{a} {shape}", "a photo of {a} {shape}", "an image of {a} {shape}")
COLOUR_TEMPLATES = ("{a} {colour} object", "something {colour}", "a photo of something {colour}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(rng: np.random.Generator, shape: str | None, colour: str | None) -> str:
    """A caption naming ``shape`` and/or ``colour`` (None = not named) with a random template and synonyms."""
    shape_word = None if shape is None else SHAPE_NAMES[shape][rng.integers(len(SHAPE_NAMES[shape]))]
    colour_word = None if colour is None else COLOUR_NAMES[colour][rng.integers(len(COLOUR_NAMES[colour]))]
    if shape_word and colour_word:
        template = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
        first = shape_word if template.startswith("{a} {shape}") else colour_word
    elif shape_word:
        template, first = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))], shape_word
    elif colour_word:
        template, first = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))], colour_word
    else:
        return ""
    return template.format(a=_article(first), shape=shape_word, colour=colour_word)


def canonical_caption(shape: str | None, colour: str | None) -> str:
    """The plain caption used for evaluation, e.g. "a red circle", "a circle", "a red object"."""
    if shape and colour:
        return f"{_article(colour)} {colour} {shape}"
    if shape:
        return f"{_article(shape)} {shape}"
    if colour:
        return f"{_article(colour)} {colour} object"
    raise ValueError("a caption needs a shape or a colour")


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(0.12, 0.88)
    tint = rng.uniform(-0.06, 0.06, size=3)
    return tuple(int(round(255 * float(np.clip(grey + t, 0.0, 1.0)))) for t in tint)


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "cross":
        w = r / 3
        pts = [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return _rotated(pts, cx, cy, angle)


def render_scene(rng: np.random.Generator, shape: str, colour: str) -> Image.Image:
    """Render ``shape`` in ``colour`` at a random size, position and slight rotation on a plain background."""
    if colour not in _COLOUR_RGB:
        raise ValueError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    size = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (size, size), _background(rng))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(6.5, 12.5) * _SUPERSAMPLE
    margin = r + _SUPERSAMPLE
    cx, cy = rng.uniform(margin, size - margin, size=2)
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in _COLOUR_RGB[colour])
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def scenes_to_tensor(images: list[Image.Image]) -> "np.ndarray":
    """Stack PIL images into a float32 array (N, 3, H, W) in [0, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def vocabulary_corpus() -> list[str]:
    """Every word the captions use, plus common prompt words, for building the tokenizer's vocabulary."""
    words = set()
    for names in (*SHAPE_NAMES.values(), *COLOUR_NAMES.values()):
        for name in names:
            words.update(name.split())
    for template in (*FULL_TEMPLATES, *SHAPE_TEMPLATES, *COLOUR_TEMPLATES):
        words.update(w for w in template.replace("{a}", "a an").split() if "{" not in w)
    words.update(_EXTRA_WORDS.split())
    return sorted(words)


_EXTRA_WORDS = """
a an the of on in with and or at by for to is are this that it its one two small large big tiny little
photo picture image painting drawing sketch render shape object thing something nothing background plain
person people man woman child dog cat car house tree flower sky sea mountain city street art artist style
van gogh picasso monet rembrandt warhol dark light bright pale white black grey gray orange purple pink brown
color colour colored coloured round star heart ring oval rectangle diamond line dot circle square triangle
cross high quality detailed simple centered left right top bottom middle near far not no without
"""
