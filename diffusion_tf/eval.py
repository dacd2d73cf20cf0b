"""Prompt adherence of a shapes model, judged by a deterministic image analyser.

    python -m diffusion_tf.eval --model FOLDER_OR_PRESET --n 100 --seed 0 --out report.json --grid grid.png
    python -m diffusion_tf.eval --dataset --n 100 --out report.json   # the analyser's self-check
    python -m diffusion_tf.eval --vae-roundtrip runs/shapes --n 400   # what the VAE alone keeps
    python -m diffusion_tf.eval --model runs/shapes --sensitivity      # which words the UNet uses
    python -m diffusion_tf.eval --concept cross --lora runs/lora_cross/lora_cross.safetensors   # a LoRA's new word
    python -m diffusion_tf.eval --lora runs/lora_cross/lora_cross.safetensors:1 --extended-judge  # the old words with it

The images are judged by `diffusion_tf.shapes.judge` (a deterministic, numpy-only
analyser of background, colour, shape and position; `judge(image, prompt)` compares its
reading with the prompt). Its names stay importable from here.

`--concept cross` draws the prompts with the shape the built-in model never saw
(`shapes.EXTRA_SHAPES`, what a LoRA teaches it) and judges them with it in the vocabulary;
`--extended-judge` judges the usual prompts that way too (a cross drawn for "circle" is then
wrong, not a circle); `--prompts FILE` judges the prompts of a file; `--lora PATH[:SCALE]`
merges LoRA files into the model.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap

import numpy as np

from diffusion_tf.shapes import dataset as shapes

# Re-exported for the callers of the old names (`components` is `connected_components` there).
from diffusion_tf.shapes.generate import generate_images
from diffusion_tf.shapes.judge import (  # noqa: F401
    ATTRIBUTES,
    CROSS_CORNER_CELL,
    CROSS_MAX_CORNER,
    FOREGROUND_DISTANCE,
    SQUARE_MIN_FILL,
    TRIANGLE_MAX_FILL,
    analyse,
    connected_components,
    format_table,
    judge,
    largest_component,
    majority3x3,
    nearest_color,
    score,
)

components = connected_components


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

    from diffusion_tf.schedulers.noise_schedule import model_target

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


def lora_argument(text):
    """`PATH[:SCALE]` -> (path, scale): only a trailing `:number` is a scale (so `C:\\x.safetensors`
    and a path with colons stay paths); the scale defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            if not math.isfinite(scale):
                raise argparse.ArgumentTypeError(f"{text!r}: the scale must be a finite number")
            return path, scale
    return text, 1.0


def read_prompts(path, vocabulary):
    """The non-empty lines of `path`, each a caption of the grammar with `vocabulary`'s shapes."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"--prompts {path!r}: {e.strerror or e}") from None
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompts.")
    for prompt in prompts:
        try:
            shapes.parse_caption(prompt, vocabulary)
        except ValueError as e:
            hint = "" if vocabulary == shapes.ALL_SHAPES else " (--extended-judge accepts the extra shapes)"
            raise ValueError(f"--prompts {path!r}: {e}{hint}") from None
    return prompts


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
    p.add_argument("--lora", metavar="PATH[:SCALE]", type=lora_argument, action="append", default=[],
                   help="merge this LoRA file into the model at SCALE (default 1); repeatable")
    p.add_argument("--concept", choices=shapes.EXTRA_SHAPES, default=None,
                   help="draw the prompts (or, with --dataset / --vae-roundtrip, the images) with this shape, "
                        "which the built-in model lacks, and judge with it in the vocabulary")
    p.add_argument("--extended-judge", action="store_true",
                   help="judge with the extra shapes in the vocabulary (a cross drawn for 'circle' is wrong, not "
                        "read as the nearest of the three); implied by --concept")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="judge the prompts of FILE (one per line) instead of drawing --n of them")
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
        from diffusion_tf.pipeline.text_to_image import Text2Image

        n = 64 if args.n is None else args.n
        try:
            pipe = Text2Image(model=args.model, loras=args.lora or None)
        except ValueError as e:
            parser.error(str(e))
        try:
            result = caption_sensitivity(pipe, n=n, seed=args.seed)
        except ValueError as e:
            parser.error(f"--sensitivity: {e}")
        print(f"model {args.model or '(default)'}: loss with each attribute changed, relative to the true caption "
              f"({n} images, seed {args.seed})")
        print(format_sensitivity(result))
        return 0
    vocabulary = shapes.ALL_SHAPES if (args.concept or args.extended_judge) else shapes.SHAPES
    drawn = (args.concept,) if args.concept else shapes.SHAPES
    if args.prompts and (args.dataset or args.vae_roundtrip):
        parser.error("--prompts judges a model's images: not with --dataset or --vae-roundtrip")
    if args.lora and (args.dataset or args.vae_roundtrip):
        parser.error("--lora changes a model: not with --dataset or --vae-roundtrip")
    if args.prompts and args.concept:
        parser.error("--prompts gives the prompts: not with --concept (use --extended-judge for the extra shapes)")
    if args.prompts:
        try:
            prompts = read_prompts(args.prompts, vocabulary)
        except ValueError as e:
            parser.error(str(e))
        args.n = len(prompts)
    args.n = 100 if args.n is None else args.n
    if args.dataset:
        images, prompts = shapes.make_dataset(args.n, args.seed, shapes=drawn)
        source = "dataset"
    elif args.vae_roundtrip:
        from diffusion_tf.training import vae as training_vae  # lazy: TensorFlow only when a model runs

        try:
            vae = training_vae.load_vae_from(args.vae_roundtrip)
        except ValueError as e:
            parser.error(f"--vae-roundtrip: {e}")
        images, prompts = shapes.make_dataset(args.n, args.seed, shapes=drawn)
        images = training_vae.vae_roundtrip(vae, images)
        source = "vae_roundtrip"
    else:
        if not args.prompts:
            prompts = shapes.sample_prompts(args.n, args.seed, shapes=drawn)
        try:
            images = generate_images(prompts, model=args.model, steps=args.steps, seed=args.seed,
                                     batch=args.batch, guidance=args.guidance, scheduler=args.scheduler,
                                     log=lambda msg: print(msg, file=sys.stderr), jit_compile=args.jit_compile,
                                     loras=args.lora or None)
        except ValueError as e:  # a bad --model, --scheduler, --steps, --guidance or --lora
            parser.error(str(e))
        source = "model"
    verdicts = [judge(img, prompt, shapes=vocabulary) for img, prompt in zip(images, prompts)]
    scores = score(verdicts)
    label = {
        "dataset": "dataset (rendered images)",
        "vae_roundtrip": f"dataset through the VAE of {args.vae_roundtrip}",
    }.get(source, f"model {args.model or '(default)'}")
    if args.lora:
        label += " with LoRA " + ", ".join(f"{path}:{scale:g}" for path, scale in args.lora)
    extra = (f"; shape {args.concept}" if args.concept else "") + (
        "; judged with the shapes " + ", ".join(vocabulary) if vocabulary != shapes.SHAPES else "")
    print(f"{label}: {args.n} prompts, seed {args.seed}" + ("" if args.steps is None else f", {args.steps} steps")
          + extra)
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
            "loras": [[path, scale] for path, scale in args.lora],
            "concept": args.concept,
            "prompts_file": args.prompts,
            "vocabulary": list(vocabulary),
            "thresholds": {
                "foreground_distance": FOREGROUND_DISTANCE,
                "triangle_max_fill": TRIANGLE_MAX_FILL,
                "square_min_fill": SQUARE_MIN_FILL,
                "cross_corner_cell": CROSS_CORNER_CELL,
                "cross_max_corner": CROSS_MAX_CORNER,
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
