"""A before/after picture of a LoRA: the same prompts and seeds without it (top row) and with it
(bottom row), each caption green when `diffusion_tf.shapes.judge` finds the image right.

    python scripts/lora_before_after.py runs/lora_cross/lora_cross.safetensors docs/images/lora_cross.png

The prompts: --new prompts naming the LoRA's shape (--concept, default cross), then --old prompts
of the three-shape grammar, drawn as `python -m diffusion_tf.eval` draws them (`sample_prompts`,
--seed); prompt k uses seed + k in both rows. Judged with the extra shapes in the vocabulary.
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lora", help="the LoRA file, PATH[:SCALE] (default scale 1)")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--model", default="shapes", help="the base model (default the built-in shapes model)")
    p.add_argument("--concept", default="cross", help="the shape the LoRA teaches (default cross)")
    p.add_argument("--new", type=int, default=8, help="prompts naming it (default 8)")
    p.add_argument("--old", type=int, default=4, help="prompts of the three-shape grammar (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the generation (default 0)")
    args = p.parse_args(argv)

    from PIL import Image, ImageDraw, ImageFont

    from diffusion_tf import Text2Image
    from diffusion_tf.eval import lora_argument, make_grid
    from diffusion_tf.shapes import dataset as shapes
    from diffusion_tf.shapes.generate import generate_images
    from diffusion_tf.shapes.judge import judge

    path, scale = lora_argument(args.lora)
    prompts = (shapes.sample_prompts(args.new, args.seed, shapes=(args.concept,))
               + shapes.sample_prompts(args.old, args.seed))
    pipe = Text2Image(model=args.model, jit_compile=True)
    rows = []
    for label in ("base model", f"with the LoRA ({os.path.basename(path)}, scale {scale:g})"):
        if label != "base model":
            pipe.load_lora(path, scale)
        images = generate_images(prompts, seed=args.seed, batch=len(prompts), pipeline=pipe, log=lambda m: None)
        verdicts = [judge(im, pr, shapes=shapes.ALL_SHAPES) for im, pr in zip(images, prompts)]
        print(f"{label}: {sum(v['all'] for v in verdicts)}/{len(prompts)} judged right")
        grid = make_grid(images, prompts, verdicts, columns=len(prompts))
        strip = Image.new("RGB", (grid.width, 16), "white")
        ImageDraw.Draw(strip).text((4, 2), label, fill="black", font=ImageFont.load_default())
        rows.append(np.concatenate([np.asarray(strip), np.asarray(grid)], axis=0))
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out} ({picture.width}x{picture.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
