"""Prompt adherence of a shapes model, judged by a deterministic image analyser.

    python -m diffusion_tf.eval --model FOLDER_OR_PRESET --n 100 --seed 0 --out report.json --grid grid.png
    python -m diffusion_tf.eval --dataset --n 100 --out report.json   # the analyser's self-check
    python -m diffusion_tf.eval --vae-roundtrip runs/shapes --n 400   # what the VAE alone keeps
    python -m diffusion_tf.eval --model runs/shapes --sensitivity      # which words the UNet uses

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
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
import time

import numpy as np

from diffusion_tf.shapes import dataset as shapes

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour (palette pairs are >= 80 apart)
TRIANGLE_MAX_FILL = 0.70  # triangle ~0.5 (0.53-0.62 measured) < 0.70 <= circle ~0.785 (0.78-0.85)
SQUARE_MIN_FILL = 0.88  # circle (<= 0.85) < 0.88 <= square ~1.0 (0.98-1.0)
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


def components(mask):
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
    labels = components(mask)
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


def analyse(image):
    """What a shapes image shows: a dict with

    background, color, shape (palette/shape names; color/shape None when no blob),
    centroid [x, y], fill_ratio, bbox [x0, y0, x1, y1] (pixel indices, inclusive),
    blob_pixels, x_third ("left" | "center" | "right"), y_third ("top" | "middle" |
    "bottom"), positions (the named thirds the centroid is in, e.g. ["left", "top"]),
    position ("left", ..., "center", or "top left" etc. in a corner), background_rgb (the
    border's median) and color_rgb (the median of the first blob's core).
    """
    image = _check_image(image)
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
    if fill < TRIANGLE_MAX_FILL:
        shape = "triangle"
    elif fill < SQUARE_MIN_FILL:
        shape = "circle"
    else:
        shape = "square"
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    x_third = _axis_third(cx, "left", "center", "right")
    y_third = _axis_third(cy, "top", "middle", "bottom")
    positions = [p for p in (y_third, x_third) if p in shapes.POSITIONS]
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
    return result


def judge(image, prompt, analysis=None):
    """Per-attribute adherence of `image` to `prompt` (a caption of the shapes grammar):
    {"color", "shape", "position", "background", "all"} booleans (position / background
    True when the prompt names none), plus "prompt", "expected" (the parsed prompt) and
    "analysis" (`analyse(image)`, or the one given)."""
    expected = shapes.parse_caption(prompt)
    a = analyse(image) if analysis is None else analysis
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


def make_grid(images, prompts, verdicts=None, columns=10, scale=2):
    """A PIL image: the tiles (scaled up `scale`x, nearest) in rows of `columns`, each
    with its prompt below (PIL's default font; green when judged right, red when not)."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("no images for the grid.")
    font = ImageFont.load_default()
    th, tw = images.shape[1] * scale, images.shape[2] * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 2

    def wrap(text):
        lines, current = [], ""
        for word in text.split():
            trial = f"{current} {word}".strip()
            if current and measure.textlength(trial, font=font) > tw - 4:
                lines.append(current)
                current = word
            else:
                current = trial
        return lines + [current] if current else lines

    wrapped = [wrap(p) for p in prompts]
    text_h = max(len(w) for w in wrapped) * line_h + 4
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    pad = 4
    cell_w, cell_h = tw + pad, th + text_h + pad
    grid = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = pad + (i % columns) * cell_w, pad + (i // columns) * cell_h
        tile = Image.fromarray(np.asarray(images[i], np.uint8)).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x, y))
        color = (0, 0, 0)
        if verdicts is not None:
            color = (0, 120, 0) if verdicts[i]["all"] else (200, 0, 0)
        for k, line in enumerate(wrapped[i]):
            draw.text((x + 1, y + th + 2 + k * line_h), line, fill=color, font=font)
    return grid


def generate_images(prompts, model=None, steps=None, seed=0, batch=10, guidance=None, scheduler=None, log=print,
                    jit_compile=False, pipeline=None):
    """One 64x64 image per prompt from `diffusion_tf.Text2Image`; prompt k uses seed + k
    (batches of `batch` prompts). `model=None` uses Text2Image's default model; `steps`
    and `guidance` None use `generate`'s defaults. `pipeline`: a Text2Image to use
    instead of building one (then `model`, `scheduler` and `jit_compile` are its own)."""
    if pipeline is not None:
        t2i = pipeline
    else:
        from diffusion_tf import Text2Image  # lazy: TensorFlow only when a model runs

        kwargs = {"img_height": shapes.IMAGE_SIZE, "img_width": shapes.IMAGE_SIZE, "jit_compile": jit_compile}
        if model is not None:
            kwargs["model"] = model
        if scheduler is not None:
            kwargs["scheduler"] = scheduler
        t2i = Text2Image(**kwargs)
    options = {}
    if steps is not None:
        options["num_steps"] = steps
    if guidance is not None:
        options["unconditional_guidance_scale"] = guidance
    out = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        # a short last batch is padded to the same size (one compiled graph); prompt k keeps seed + k
        padded = chunk + [chunk[-1]] * (min(batch, len(prompts)) - len(chunk))
        images = np.asarray(t2i.generate(padded, seed=seed + b, batch_size=1, **options))
        if images.shape[0] != len(padded):
            raise ValueError(f"the model returned {images.shape[0]} images for {len(padded)} prompts.")
        out.append(images[:len(chunk)])
        log(f"generated {b + len(chunk)}/{len(prompts)} ({time.perf_counter() - start:.1f} s)")
    return np.concatenate(out, axis=0)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


SENSITIVITY_TIMESTEPS = (200, 500, 700, 850, 950)
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def altered_caption(spec, attribute):
    """The caption of `spec` (which names position and background) with `attribute`
    changed: the next palette colour that is neither the shape's nor the background's,
    the next shape, or the opposite position."""
    if attribute == "color":
        value = _next(shapes.COLORS, spec.color, exclude=(spec.color, spec.background))
    elif attribute == "background":
        value = _next(shapes.COLORS, spec.background, exclude=(spec.color, spec.background))
    elif attribute == "shape":
        value = _next(shapes.SHAPES, spec.shape)
    elif attribute == "position":
        value = _OPPOSITE[spec.position]
    else:
        raise ValueError(f"attribute={attribute!r}; expected one of {ATTRIBUTES}.")
    return shapes.caption(dataclasses.replace(spec, **{attribute: value}))


def _next(values, current, exclude=()):
    i = list(values).index(current)
    for k in range(1, len(values) + 1):
        candidate = values[(i + k) % len(values)]
        if candidate not in exclude and candidate != current:
            return candidate
    raise ValueError(f"no alternative to {current!r} in {values!r}")


def caption_sensitivity(pipeline, n=64, seed=0, timesteps=SENSITIVITY_TIMESTEPS):
    """How much the denoiser uses each word of the caption: its training loss on `n`
    dataset images (every caption naming position and background) with the true caption
    and with one attribute changed (`altered_caption`), at each timestep of `timesteps`
    (the same noise for both). Returns {"loss": {t: loss}, attribute: {t: gap}}, gap =
    (altered - true) / true: 0 when the UNet ignores that word, positive when it uses it.
    Seconds for the small shapes model; `pipeline` is a 64x64 `Text2Image`."""
    from keras import ops

    from diffusion_tf.schedulers.schedule import model_target

    if (pipeline.img_height, pipeline.img_width) != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
        raise ValueError(
            f"caption_sensitivity needs a {shapes.IMAGE_SIZE}x{shapes.IMAGE_SIZE} shapes model; "
            f"this one makes {pipeline.img_height}x{pipeline.img_width} images."
        )
    scheduler = pipeline.scheduler
    alpha_bar = np.asarray(scheduler.alphas_cumprod, np.float64)
    for t in timesteps:
        if not 0 <= int(t) < len(alpha_bar):
            raise ValueError(f"timestep {t} is outside 0..{len(alpha_bar) - 1}.")
    images, captions, specs = shapes.make_dataset(n, seed, p_position=1.0, p_background=1.0, return_specs=True)
    x0 = np.asarray(ops.convert_to_numpy(pipeline.encode(images)), np.float64)
    contexts = {"true": pipeline.encode_text(captions)}
    for attribute in ATTRIBUTES:
        contexts[attribute] = pipeline.encode_text([altered_caption(s, attribute) for s in specs])
    rng = np.random.default_rng(seed)
    out = {"loss": {}, **{a: {} for a in ATTRIBUTES}}
    for t in timesteps:
        a = alpha_bar[int(t)]
        eps = rng.standard_normal(x0.shape)
        noisy = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
        target = model_target(scheduler.prediction_type, x0, eps, a)
        steps = np.full((n,), float(t), np.float32)

        def loss(context):
            pred = ops.convert_to_numpy(pipeline.predict_noise(noisy, steps, context))
            return float(np.mean((np.asarray(pred, np.float64) - target) ** 2))

        base = loss(contexts["true"])
        out["loss"][int(t)] = base
        for attribute in ATTRIBUTES:
            out[attribute][int(t)] = (loss(contexts[attribute]) - base) / base
    return out


def format_sensitivity(result):
    """`caption_sensitivity`'s result as a text table (gaps in percent)."""
    steps = list(result["loss"])
    lines = ["attribute   " + " ".join(f"t={t:<6d}" for t in steps)]
    lines.append("loss        " + " ".join(f"{result['loss'][t]:<8.4f}" for t in steps))
    for attribute in ATTRIBUTES:
        lines.append(f"{attribute:<12s}" + " ".join(f"{100 * result[attribute][t]:+7.2f}%" for t in steps))
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m diffusion_tf.eval",
        description=textwrap.dedent(
            """\
            Prompt adherence on the captioned-shapes grammar: draw N prompts, generate one
            64x64 image per prompt, judge colour, shape, position and background with the
            deterministic analyser, print the scores, write a JSON report."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="model folder or preset name (default: Text2Image's default model)")
    src.add_argument("--dataset", action="store_true",
                     help="judge the dataset's own rendered images (make_dataset(N, SEED)) instead of a model: "
                          "the analyser's self-check")
    src.add_argument("--vae-roundtrip", default=None, metavar="SOURCE",
                     help="judge the dataset's images after encode -> decode by the VAE of SOURCE (a model "
                          "folder, a training --save folder or its checkpoints/vae.h5): what the VAE alone "
                          "keeps, the ceiling of a model that uses it")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --model: instead of sampling, the denoiser's loss with each attribute of the "
                        "caption changed, by timestep (which words the UNet uses; N images, default 64)")
    p.add_argument("--n", type=_positive_int, default=None, help="number of prompts (default 100)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the prompts and of the generation (prompt k uses seed + k; default 0)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps (default: Text2Image.generate's default)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: Text2Image.generate's default)")
    p.add_argument("--scheduler", default=None, help="scheduler name (default: Text2Image's)")
    p.add_argument("--jit-compile", action="store_true", help="compile the generation with XLA")
    p.add_argument("--batch", type=_positive_int, default=10, help="prompts per generate call (default 10)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--grid", default=None, help="write a grid PNG of the images with their prompts here")
    p.add_argument("--columns", type=_positive_int, default=10, help="grid columns (default 10)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sensitivity:
        if args.dataset or args.vae_roundtrip:
            parser.error("--sensitivity measures a model: use it with --model (or the default model)")
        from diffusion_tf.text2image import Text2Image

        n = 64 if args.n is None else args.n
        pipe = Text2Image(model=args.model)
        try:
            result = caption_sensitivity(pipe, n=n, seed=args.seed)
        except ValueError as e:
            parser.error(f"--sensitivity: {e}")
        print(f"model {args.model or '(default)'}: loss with each attribute changed, relative to the true caption "
              f"({n} images, seed {args.seed})")
        print(format_sensitivity(result))
        return 0
    args.n = 100 if args.n is None else args.n
    if args.dataset:
        images, prompts = shapes.make_dataset(args.n, args.seed)
        source = "dataset"
    elif args.vae_roundtrip:
        from diffusion_tf import train  # lazy: TensorFlow only when a model runs

        try:
            vae = train.load_vae_from(args.vae_roundtrip)
        except ValueError as e:
            parser.error(f"--vae-roundtrip: {e}")
        images, prompts = shapes.make_dataset(args.n, args.seed)
        images = train.vae_roundtrip(vae, images)
        source = "vae_roundtrip"
    else:
        prompts = shapes.sample_prompts(args.n, args.seed)
        try:
            images = generate_images(prompts, model=args.model, steps=args.steps, seed=args.seed,
                                     batch=args.batch, guidance=args.guidance, scheduler=args.scheduler,
                                     log=lambda msg: print(msg, file=sys.stderr), jit_compile=args.jit_compile)
        except ValueError as e:  # a bad --model, --scheduler, --steps or --guidance
            parser.error(str(e))
        source = "model"
    verdicts = [judge(img, prompt) for img, prompt in zip(images, prompts)]
    scores = score(verdicts)
    label = {
        "dataset": "dataset (rendered images)",
        "vae_roundtrip": f"dataset through the VAE of {args.vae_roundtrip}",
    }.get(source, f"model {args.model or '(default)'}")
    print(f"{label}: {args.n} prompts, seed {args.seed}" + ("" if args.steps is None else f", {args.steps} steps"))
    print(format_table(scores))
    if args.out:
        report = {
            "source": source,
            "model": {"dataset": None, "vae_roundtrip": args.vae_roundtrip}.get(source, args.model),
            "n": args.n,
            "seed": args.seed,
            "steps": args.steps,
            "guidance": args.guidance,
            "scheduler": args.scheduler,
            "thresholds": {
                "foreground_distance": FOREGROUND_DISTANCE,
                "triangle_max_fill": TRIANGLE_MAX_FILL,
                "square_min_fill": SQUARE_MIN_FILL,
                "third_low": shapes.THIRD_LOW,
                "third_high": shapes.THIRD_HIGH,
            },
            "scores": scores,
            "items": [{k: v[k] for k in ("prompt",) + ATTRIBUTES + ("all", "expected", "analysis")}
                      for v in verdicts],
        }
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    if args.grid:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        tmp = args.grid + ".tmp"
        make_grid(images, prompts, verdicts, columns=args.columns).save(tmp, format="PNG")
        os.replace(tmp, args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
