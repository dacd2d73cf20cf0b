"""The judge of one shapes image against its caption: a deterministic image analyser.

The analyser (`analyse`), numpy only, in two passes:

1. background: the median of the image's border pixels (all four edges) -> the nearest
   palette colour (Euclidean distance in RGB);
2. colour: the pixels farther than `FOREGROUND_DISTANCE` from that background colour;
   their largest 4-connected component (label propagation in numpy) is the first blob;
   the median colour of its core (the half of its pixels farthest from the background,
   so that blurred edges do not pull it) -> the nearest palette colour;
3. the blob: the pixels nearer to that colour than to the background (the 50% contour
   of a blurred edge), cleaned by a 3x3 majority vote (drops isolated noise pixels and
   one-pixel spurs), and their largest 4-connected component;
4. shape: the blob's fill ratio (pixels / area of its bounding box): a square fills
   1.0, a circle pi/4 = 0.785, a triangle 0.5; below `TRIANGLE_MAX_FILL` -> triangle,
   from `SQUARE_MIN_FILL` up -> square, between -> circle. Rendered dataset shapes
   measure: triangle 0.53-0.62, circle 0.78-0.85, square 0.98-1.0;
5. position: the blob's centroid (x, y), in pixels from the top-left corner with pixel
   (row i, column j) at (j + 0.5, i + 0.5). Each axis is read on its own, with the
   dataset's thirds: x < 22 left, x > 42 right, else centre; y < 22 top, y > 42 bottom,
   else middle. A requested position is judged on its own axis only ("on the left" is
   met by any centroid with x < 22, in a corner or not). `position` in the result is a
   single word: the named third when the centroid is in exactly one, "center" when in
   none, and "top left" (etc.) in a corner; `positions` lists the thirds it is in.

`judge(image, prompt)` compares the analysis with the prompt (parsed by
`diffusion_tf.shapes.parse_caption`); position and background are True when the prompt
does not name them.

The extra shape "cross" (`shapes.EXTRA_SHAPES`, the LoRA demo's new word) is read only
when the caller asks for it (`shapes=shapes.ALL_SHAPES`): then step 4 first measures the
blob's `corner_fill`, the largest fill among the four corner cells of its bounding box
(each `CROSS_CORNER_CELL` = 0.28 of its width and of its height), and reads a cross when it
is below `CROSS_MAX_CORNER` = 0.3; else the three-shape rule. A cross leaves its corner
ninths empty (0.0 rendered; under 0.24 for 95% of them after the built-in model's VAE round
trip, 0.50 at most); circles fill their corner cells 0.38-0.53 (0.39-0.84 after the round
trip), triangles their lower ones 0.79-0.94, squares 0.96-1.0 (0.72 or more); measured on
800 images. With the default `shapes` nothing of this runs: the readings and the result's
keys are the three-shape judge's.
"""

import numpy as np

from diffusion_tf.shapes import dataset as shapes

_shapes = shapes  # the module, where a parameter named `shapes` hides it

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour (palette pairs are >= 80 apart)
TRIANGLE_MAX_FILL = 0.70  # triangle ~0.5 (0.53-0.62 measured) < 0.70 <= circle ~0.785 (0.78-0.85)
SQUARE_MIN_FILL = 0.88  # circle (<= 0.85) < 0.88 <= square ~1.0 (0.98-1.0)
# With "cross" in the vocabulary: corner cells of 0.28 x 0.28 of the bounding box; a cross's are
# empty (0.0; < 0.24 for 95% after the VAE), a circle's >= 0.38 filled.
CROSS_CORNER_CELL = 0.28
CROSS_MAX_CORNER = 0.3
ATTRIBUTES = ("color", "shape", "position", "background")

_NAMES = list(shapes.PALETTE)
_RGB = np.array(list(shapes.PALETTE.values()), np.float64)


def nearest_color(rgb):
    """The palette name nearest (Euclidean, RGB) to `rgb`."""
    d = np.sum((_RGB - np.asarray(rgb, np.float64)) ** 2, axis=1)
    return _NAMES[int(np.argmin(d))]


def _check_image(image):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 3 or image.shape[1] < 3:
        raise ValueError(f"image has shape {image.shape}; expected [H, W, 3] (H, W >= 3).")
    if image.dtype != np.uint8:
        raise ValueError(f"image has dtype {image.dtype}; expected uint8.")
    return image


def connected_components(mask):
    """int labels [H, W] of the 4-connected components of bool `mask`; -1 outside.

    Each component is labelled with the flat index of its first pixel (row-major):
    min-label propagation to the four neighbours plus pointer jumping, until stable.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    n = h * w
    flat_mask = mask.ravel()
    labels = np.where(mask, np.arange(n).reshape(h, w), n)
    while True:
        new = labels.copy()
        np.minimum(new[1:, :], labels[:-1, :], out=new[1:, :])
        np.minimum(new[:-1, :], labels[1:, :], out=new[:-1, :])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = n
        flat = new.ravel()
        # pointer jumping: a label is a pixel of the same component with a smaller label
        for _ in range(2):
            flat[flat_mask] = flat[flat[flat_mask]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, -1)


def largest_component(mask):
    """bool [H, W]: the largest 4-connected component of `mask` (ties: the first in
    row-major order); all False when `mask` is empty."""
    labels = connected_components(mask)
    if not np.any(labels >= 0):
        return np.zeros(labels.shape, bool)
    counts = np.bincount(labels[labels >= 0].ravel())
    return labels == int(np.argmax(counts))


def majority3x3(mask):
    """bool [H, W]: True where at least 5 of the 3x3 neighbourhood (edge-replicated) is."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    padded = np.pad(mask, 1, mode="edge").astype(np.int8)
    votes = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return votes >= 5


def _axis_third(value, low_name, mid_name, high_name):
    if value < shapes.THIRD_LOW:
        return low_name
    if value > shapes.THIRD_HIGH:
        return high_name
    return mid_name


def corner_fill(blob, bbox, cell=None):
    """The largest fill among the four corner cells of `bbox` ([x0, y0, x1, y1], inclusive),
    each `cell` (default `CROSS_CORNER_CELL`) of its width and of its height (by pixel
    centres), in bool `blob`."""
    cell = CROSS_CORNER_CELL if cell is None else cell
    x0, y0, x1, y1 = bbox
    sub = np.asarray(blob, bool)[y0:y1 + 1, x0:x1 + 1]
    h, w = sub.shape
    v = (np.arange(h) + 0.5) / h
    u = (np.arange(w) + 0.5) / w
    best = 0.0
    for rows in (v < cell, v > 1 - cell):
        for cols in (u < cell, u > 1 - cell):
            part = sub[np.ix_(rows, cols)]
            if part.size:
                best = max(best, float(part.mean()))
    return best


def analyse(image, shapes=shapes.SHAPES):
    """What a shapes image shows: a dict with

    background, color, shape (palette/shape names; color/shape None when no blob),
    centroid [x, y], fill_ratio, bbox [x0, y0, x1, y1] (pixel indices, inclusive),
    blob_pixels, x_third ("left" | "center" | "right"), y_third ("top" | "middle" |
    "bottom"), positions (the named thirds the centroid is in, e.g. ["left", "top"]),
    position ("left", ..., "center", or "top left" etc. in a corner), background_rgb (the
    border's median) and color_rgb (the median of the first blob's core). `shapes`: the
    shape words it may read; with "cross" among them (`shapes.ALL_SHAPES`) it also reads
    crosses, and the dict has "corner_fill" (`corner_fill`).
    """
    image = _check_image(image)
    crosses = "cross" in shapes
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    to_bg = np.sqrt(np.sum((pixels - _RGB[_NAMES.index(background)]) ** 2, axis=-1))
    first = largest_component(to_bg > FOREGROUND_DISTANCE)
    result = {
        "background": background,
        "background_rgb": [round(float(v), 1) for v in bg_rgb],
        "color": None,
        "color_rgb": None,
        "shape": None,
        "blob_pixels": 0,
        "fill_ratio": None,
        "bbox": None,
        "centroid": None,
        "x_third": None,
        "y_third": None,
        "positions": [],
        "position": None,
    }
    if crosses:
        result["corner_fill"] = None
    if not first.any():
        return result
    # colour: the median of the blob's core (its pixels farthest from the background)
    distances = to_bg[first]
    core = pixels[first][distances >= np.median(distances)]
    color_rgb = np.median(core, axis=0)
    color = nearest_color(color_rgb)
    # the blob: nearer to the shape's colour than to the background, majority-cleaned
    to_color = np.sqrt(np.sum((pixels - _RGB[_NAMES.index(color)]) ** 2, axis=-1))
    blob = largest_component(majority3x3(to_color < to_bg))
    if not blob.any():
        blob = first
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    fill = blob.sum() / float((x1 - x0 + 1) * (y1 - y0 + 1))
    corners = corner_fill(blob, (x0, y0, x1, y1)) if crosses else None
    if corners is not None and corners < CROSS_MAX_CORNER:
        shape = "cross"
    elif fill < TRIANGLE_MAX_FILL:
        shape = "triangle"
    elif fill < SQUARE_MIN_FILL:
        shape = "circle"
    else:
        shape = "square"
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    x_third = _axis_third(cx, "left", "center", "right")
    y_third = _axis_third(cy, "top", "middle", "bottom")
    positions = [p for p in (y_third, x_third) if p in _shapes.POSITIONS]
    result.update(
        color=color,
        blob_pixels=int(blob.sum()),
        color_rgb=[round(float(v), 1) for v in color_rgb],
        shape=shape,
        fill_ratio=round(float(fill), 4),
        bbox=[x0, y0, x1, y1],
        centroid=[round(cx, 3), round(cy, 3)],
        x_third=x_third,
        y_third=y_third,
        positions=positions,
        position=" ".join(positions) if positions else "center",
    )
    if crosses:
        result["corner_fill"] = round(corners, 4)
    return result


def judge(image, prompt, analysis=None, shapes=shapes.SHAPES):
    """Per-attribute adherence of `image` to `prompt` (a caption of the shapes grammar):
    {"color", "shape", "position", "background", "all"} booleans (position / background
    True when the prompt names none), plus "prompt", "expected" (the parsed prompt) and
    "analysis" (`analyse(image, shapes)`, or the one given). `shapes`: the shape words of
    the prompts and of the readings (default the grammar's three; `ALL_SHAPES` adds "cross")."""
    expected = _shapes.parse_caption(prompt, shapes)
    a = analyse(image, shapes) if analysis is None else analysis
    position = expected["position"]
    verdict = {
        "color": a["color"] == expected["color"],
        "shape": a["shape"] == expected["shape"],
        "position": position is None or position in a["positions"],
        "background": expected["background"] is None or a["background"] == expected["background"],
    }
    verdict["all"] = all(verdict.values())
    verdict.update(prompt=prompt, expected=expected, analysis=a)
    return verdict


def score(verdicts):
    """Scores of a list of `judge` results: {"n", "color", ..., "all"} (fractions over all
    prompts; position/background count unnamed ones as met) and "named" (position and
    background over the prompts that name them: {"n", "score"})."""
    n = len(verdicts)
    out = {"n": n}
    for key in ATTRIBUTES + ("all",):
        out[key] = sum(bool(v[key]) for v in verdicts) / n if n else 0.0
    named = {}
    for key in ("position", "background"):
        sub = [v for v in verdicts if v["expected"][key] is not None]
        named[key] = {"n": len(sub), "score": sum(bool(v[key]) for v in sub) / len(sub) if sub else None}
    out["named"] = named
    return out


def format_table(scores):
    """The per-attribute scores as a text table."""
    n = scores["n"]
    lines = [f"{'attribute':<12}{'score':>8}  {'count':>9}  named-only", "-" * 44]
    for key in ATTRIBUTES + ("all",):
        frac = scores[key]
        extra = ""
        if key in scores["named"]:
            named = scores["named"][key]
            extra = "n/a" if named["score"] is None else f"{100 * named['score']:.1f}% of {named['n']}"
        lines.append(f"{key:<12}{100 * frac:>7.1f}%  {round(frac * n):>4}/{n:<4}  {extra}")
    return "\n".join(lines)
