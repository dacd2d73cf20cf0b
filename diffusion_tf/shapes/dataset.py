"""The captioned-shapes dataset: 64x64 RGB images of one coloured shape, with a caption.

Caption grammar, exactly::

    "{a|an} {color} {shape}[ on the {left|right|top|bottom}][ on {a|an} {bg} background]"

The article is chosen by the word that follows it ("an orange", "a red"). Eight colours
(`PALETTE`), three shapes (`SHAPES`): circle, square (axis-aligned), triangle (pointing
up), 18-30 px across. The background is a palette colour different from the shape's,
random when the caption does not name it. A named position puts the shape's centre in
that third of the image (left: x < 22, right: x > 42, top: y < 22, bottom: y > 42) on its
own axis; the other axis, and both when no position is named, is anywhere that keeps the
whole shape inside the image.

Geometry (continuous coordinates, pixel (row i, column j) covers [j, j+1) x [i, i+1) and
is painted when its centre (j + 0.5, i + 0.5) lies in the shape; crisp, no anti-aliasing):

- circle: diameter `size`, centred on (cx, cy);
- square: side `size`, centred on (cx, cy);
- triangle: base `size` and height `size`, apex up; (cx, cy) is its centroid (the apex
  is 2/3 of the height above it, the base 1/3 below), so that "the shape's centre" is
  its centre of mass for every shape, which is what `diffusion_tf.shapes.judge` measures.

Centres are whole numbers, and named positions keep a margin of 2 px inside their third
(x <= 20 for left, x >= 44 for right, the same for top/bottom), so the measured pixel
centroid always lands in the third.

One shape outside the grammar, `EXTRA_SHAPES` = ("cross",), is what the built-in model
never saw: the LoRA demo's new word (README, "Training a LoRA"). It is opt-in: the
functions that draw or parse take `shapes=` (default `SHAPES`, so the dataset, its bytes
and the parser are those of the three shapes unless a caller names "cross"):

- cross: an upright plus sign, `size` across in both directions, centred on (cx, cy);
  its two arms are size / 3 thick (the pixels of the size x size square whose centre is
  less than size / 6 from the vertical or the horizontal centre line), so each corner
  ninth of its bounding box is empty.

Pure numpy (no TensorFlow, no PIL), so importing it is cheap. Randomness
comes from `numpy.random.Generator(PCG64)`, so a seed gives identical bytes in every
process and on every platform.
"""

import dataclasses
import math
import re
from collections import OrderedDict

import numpy as np

IMAGE_SIZE = 64
PALETTE = OrderedDict(
    [
        ("red", (220, 40, 40)),
        ("green", (40, 180, 60)),
        ("blue", (40, 80, 220)),
        ("yellow", (240, 220, 40)),
        ("orange", (245, 140, 30)),
        ("purple", (140, 60, 200)),
        ("white", (245, 245, 245)),
        ("black", (20, 20, 20)),
    ]
)
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Shapes outside the grammar of the built-in model, used only where a caller asks for them.
EXTRA_SHAPES = ("cross",)
ALL_SHAPES = SHAPES + EXTRA_SHAPES
POSITIONS = ("left", "right", "top", "bottom")
MIN_SIZE, MAX_SIZE = 18, 30
# The thirds: the centre is in "left" when x < LOW, "right" when x > HIGH (same for y).
THIRD_LOW, THIRD_HIGH = 22, 42
# Named positions keep their centre this far inside the third (integer centres).
_NAMED_LOW_MAX, _NAMED_HIGH_MIN = THIRD_LOW - 2, THIRD_HIGH + 2


def article(word):
    """"an" before a vowel sound (here: a vowel letter), else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One image: what is drawn, where, and whether the caption names position/background.

    `position` is None when the caption names none; `background` is always a colour
    (`background_named` says whether the caption names it). `size` is the shape's width
    (and height) in pixels; (cx, cy) its centre (the centroid for a triangle), in pixels
    from the top-left corner.
    """

    color: str
    shape: str
    position: object  # str or None
    background: str
    background_named: bool
    size: int
    cx: int
    cy: int

    def __post_init__(self):
        if self.color not in PALETTE:
            raise ValueError(f"color={self.color!r}; allowed: {', '.join(COLORS)}.")
        if self.background not in PALETTE:
            raise ValueError(f"background={self.background!r}; allowed: {', '.join(COLORS)}.")
        if self.background == self.color:
            raise ValueError(f"background {self.background!r} equals the shape's colour.")
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"shape={self.shape!r}; allowed: {', '.join(ALL_SHAPES)}.")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position={self.position!r}; allowed: None, {', '.join(POSITIONS)}.")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size={self.size}; must be in [{MIN_SIZE}, {MAX_SIZE}].")

    @property
    def extent(self):
        """(x0, y0, x1, y1): the shape's bounding box in continuous coordinates."""
        return _extent(self.shape, self.size, self.cx, self.cy)


def _extent(shape, size, cx, cy):
    half = size / 2
    if shape == "triangle":
        return (cx - half, cy - 2 * size / 3, cx + half, cy + size / 3)
    return (cx - half, cy - half, cx + half, cy + half)


def _centre_range(shape, size, axis):
    """Integer centres on `axis` ("x" or "y") that keep the whole shape in the image."""
    if axis == "y" and shape == "triangle":
        above, below = 2 * size / 3, size / 3
    else:
        above = below = size / 2
    return math.ceil(above), math.floor(IMAGE_SIZE - below)


def _draw_centre(rng, shape, size, axis, position):
    lo, hi = _centre_range(shape, size, axis)
    if position in ("left", "top"):
        hi = min(hi, _NAMED_LOW_MAX)
    elif position in ("right", "bottom"):
        lo = max(lo, _NAMED_HIGH_MIN)
    if lo > hi:  # cannot happen for sizes <= 30; kept as a guard
        raise ValueError(f"no room for a {size}px {shape} on the {position}.")
    return int(rng.integers(lo, hi + 1))


def check_shapes(shapes):
    """`shapes` as a tuple of distinct names from `ALL_SHAPES` (ValueError naming the value)."""
    if isinstance(shapes, str):
        shapes = (shapes,)
    shapes = tuple(shapes)
    bad = [s for s in shapes if s not in ALL_SHAPES]
    if not shapes or bad or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes={shapes!r}; must be distinct names from {', '.join(ALL_SHAPES)}.")
    return shapes


def random_spec(rng, p_position=0.5, p_background=0.5, shapes=SHAPES):
    """A random `Spec` drawn with `rng` (a `numpy.random.Generator`).

    The caption names a position with probability `p_position` (then one of the four,
    uniformly) and the background with probability `p_background`; the shape is one of
    `shapes`, uniformly (the same draws as before `shapes` existed when it is `SHAPES`).
    """
    if not 0 <= p_position <= 1 or not 0 <= p_background <= 1:
        raise ValueError(f"p_position={p_position}, p_background={p_background}; must be in [0, 1].")
    if shapes is not SHAPES:
        shapes = check_shapes(shapes)
    color = COLORS[int(rng.integers(len(COLORS)))]
    shape = shapes[int(rng.integers(len(shapes)))]
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    position = POSITIONS[int(rng.integers(len(POSITIONS)))] if rng.random() < p_position else None
    background_named = bool(rng.random() < p_background)
    others = [c for c in COLORS if c != color]
    background = others[int(rng.integers(len(others)))]
    x_pos = position if position in ("left", "right") else None
    y_pos = position if position in ("top", "bottom") else None
    cx = _draw_centre(rng, shape, size, "x", x_pos)
    cy = _draw_centre(rng, shape, size, "y", y_pos)
    return Spec(color, shape, position, background, background_named, size, cx, cy)


def caption(spec):
    """The caption of `spec`, per the grammar."""
    text = f"{article(spec.color)} {spec.color} {spec.shape}"
    if spec.position is not None:
        text += f" on the {spec.position}"
    if spec.background_named:
        text += f" on {article(spec.background)} {spec.background} background"
    return text


_COLOR_RE = "|".join(COLORS)


def _caption_re(shapes):
    return re.compile(
        rf"(?P<art>an?) (?P<color>{_COLOR_RE}) (?P<shape>{'|'.join(shapes)})"
        rf"(?: on the (?P<position>{'|'.join(POSITIONS)}))?"
        rf"(?: on (?P<bg_art>an?) (?P<background>{_COLOR_RE}) background)?"
    )


_CAPTION_RE = _caption_re(SHAPES)
_CAPTION_RES = {SHAPES: _CAPTION_RE}


def parse_caption(text, shapes=SHAPES):
    """{"color", "shape", "position" (or None), "background" (or None)} of a caption.

    Case and surrounding whitespace are ignored; anything else must fit the grammar
    exactly (right articles, single spaces, a background different from the shape's
    colour), else ValueError naming the text. `shapes`: the shape words accepted (default
    the grammar's three; `ALL_SHAPES` adds "cross").
    """
    if not isinstance(text, str):
        raise ValueError(f"caption {text!r} is not a string.")
    shapes = SHAPES if shapes is SHAPES else check_shapes(shapes)
    if shapes not in _CAPTION_RES:
        _CAPTION_RES[shapes] = _caption_re(shapes)
    m = _CAPTION_RES[shapes].fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(
            f"caption {text!r} does not fit the grammar "
            "'{a|an} {color} {shape}[ on the {left|right|top|bottom}][ on {a|an} {bg} background]' "
            f"(colors: {', '.join(COLORS)}; shapes: {', '.join(shapes)})."
        )
    color, background = m["color"], m["background"]
    if m["art"] != article(color):
        raise ValueError(f"caption {text!r}: the article before {color!r} must be {article(color)!r}.")
    if background is not None:
        if m["bg_art"] != article(background):
            raise ValueError(
                f"caption {text!r}: the article before {background!r} must be {article(background)!r}."
            )
        if background == color:
            raise ValueError(f"caption {text!r}: the background must differ from the shape's colour.")
    return {"color": color, "shape": m["shape"], "position": m["position"], "background": background}


_RGB = {name: np.array(rgb, np.uint8) for name, rgb in PALETTE.items()}
# Pixel-centre coordinates, shared by every render.
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5


def shape_mask(shape, size, cx, cy):
    """bool [64, 64]: the pixels whose centre lies in the shape."""
    if shape not in ALL_SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(ALL_SHAPES)}.")
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    # only the pixels of the bounding box can be in the shape (an exact speed-up)
    x0, y0, x1, y1 = _extent(shape, size, cx, cy)
    c0, c1 = max(0, math.floor(x0) - 1), min(IMAGE_SIZE, math.ceil(x1) + 1)
    r0, r1 = max(0, math.floor(y0) - 1), min(IMAGE_SIZE, math.ceil(y1) + 1)
    if c0 >= c1 or r0 >= r1:
        return mask
    half = size / 2
    dx, dy = _XX[r0:r1, c0:c1] - cx, _YY[r0:r1, c0:c1] - cy
    if shape == "circle":
        inside = dx * dx + dy * dy < half * half
    elif shape == "square":
        inside = (dx >= -half) & (dx < half) & (dy >= -half) & (dy < half)
    elif shape == "cross":
        arm = size / 6  # half the thickness of an arm
        inside = ((dx >= -half) & (dx < half) & (dy >= -half) & (dy < half)
                  & ((np.abs(dx) < arm) | (np.abs(dy) < arm)))
    else:
        # triangle: apex (cx, cy - 2s/3), base from (cx - s/2, cy + s/3) to (cx + s/2, cy + s/3)
        depth = dy + 2 * size / 3  # distance below the apex
        inside = (depth >= 0) & (depth < size) & (np.abs(dx) < depth * half / size)
    mask[r0:r1, c0:c1] = inside
    return mask


def render(spec):
    """uint8 [64, 64, 3]: the image of `spec` (crisp edges)."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[...] = _RGB[spec.background]
    image[shape_mask(spec.shape, spec.size, spec.cx, spec.cy)] = _RGB[spec.color]
    return image


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r}; must be an integer >= 0.")
    return int(n)


def _rng(seed, stream):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; must be an integer >= 0.")
    return np.random.Generator(np.random.PCG64([int(seed), stream]))


def random_specs(n, seed, p_position=0.5, p_background=0.5, shapes=SHAPES):
    """n specs drawn deterministically from `seed` (the stream `make_dataset` uses)."""
    rng = _rng(seed, 0)
    return [random_spec(rng, p_position, p_background, shapes) for _ in range(_check_n(n))]


def make_dataset(n, seed, p_position=0.5, p_background=0.5, return_specs=False, shapes=SHAPES):
    """(images uint8 [n, 64, 64, 3], captions list[str]); the same seed gives the same bytes.

    With `return_specs=True` the list of `Spec`s comes third. `shapes`: the shapes drawn
    (default the grammar's three; e.g. ("cross",) for images of the extra shape only).
    """
    specs = random_specs(n, seed, p_position, p_background, shapes)
    images = np.empty((len(specs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render(spec)
    captions = [caption(s) for s in specs]
    return (images, captions, specs) if return_specs else (images, captions)


def sample_prompts(n, seed, p_position=0.5, p_background=0.5, shapes=SHAPES):
    """n captions drawn from the grammar (for evaluation), from a stream separate from
    `make_dataset`'s, so `sample_prompts(n, s)` is not `make_dataset(n, s)`'s captions.
    `shapes`: the shapes the prompts name (default the grammar's three)."""
    rng = _rng(seed, 1)
    return [caption(random_spec(rng, p_position, p_background, shapes)) for _ in range(_check_n(n))]
