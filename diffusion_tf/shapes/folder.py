"""Captioned shapes as a LoRA data folder (kohya convention: image + same-named .txt caption).

    python -m diffusion_tf.shapes.folder data/cross --shape cross --n 200 --seed 1
    python -m diffusion_tf.shapes.folder data/cross --shape cross --n 200 --base-images 200

writes OUT/<repeats>_<shape>/00000.png + 00000.txt, ... (`make_dataset(n, seed, shapes=(shape,))`:
every image shows that shape, with the grammar's colours, positions and backgrounds), and with
--base-images M also OUT/<base repeats>_shapes/: M images of the grammar's three shapes
(`make_dataset(M, seed + 1)`), the regularisation images that keep a LoRA from drawing the new
shape for the old words (kohya's prior preservation). `python -m diffusion_tf.train --stage
lora --data OUT` reads it (`diffusion_tf.training.imagefolder`).
"""

import argparse
import os
import sys

from diffusion_tf.shapes import dataset as shapes


def write_images(folder, images, captions):
    """OUT/00000.png + 00000.txt, ... for each image and caption; returns the number written."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        stem = os.path.join(folder, f"{i:05d}")
        Image.fromarray(image).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption + "\n")
    return len(images)


def write_folder(out, shape="cross", n=200, seed=1, repeats=1, base_images=0, base_repeats=1):
    """The LoRA data folder `out` (see the module docstring); returns {subfolder: images}."""
    shapes.check_shapes((shape,))
    for name, value, minimum in (("n", n, 1), ("repeats", repeats, 1), ("base_images", base_images, 0),
                                 ("base_repeats", base_repeats, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r}; must be an integer >= {minimum}.")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out!r} is not empty; choose a new folder.")
    written = {}
    images, captions = shapes.make_dataset(n, seed, shapes=(shape,))
    sub = f"{repeats}_{shape}"
    written[sub] = write_images(os.path.join(out, sub), images, captions)
    if base_images:
        images, captions = shapes.make_dataset(base_images, seed + 1)
        sub = f"{base_repeats}_shapes"
        written[sub] = write_images(os.path.join(out, sub), images, captions)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusion_tf.shapes.folder",
                                description="Write captioned shapes as a LoRA data folder (image + .txt).")
    p.add_argument("out", help="the folder to write (new or empty)")
    p.add_argument("--shape", default="cross", choices=shapes.ALL_SHAPES,
                   help="the shape every image shows (default cross, the word the built-in model lacks)")
    p.add_argument("--n", type=int, default=200, help="images of that shape (default 200)")
    p.add_argument("--seed", type=int, default=1, help="seed of the images (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="kohya repeats of those images (default 1)")
    p.add_argument("--base-images", type=int, default=0,
                   help="also this many images of the grammar's three shapes (default 0)")
    p.add_argument("--base-repeats", type=int, default=1, help="kohya repeats of those (default 1)")
    args = p.parse_args(argv)
    try:
        written = write_folder(args.out, args.shape, args.n, args.seed, args.repeats, args.base_images,
                               args.base_repeats)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for sub, count in written.items():
        print(f"wrote {count} captioned images to {os.path.join(args.out, sub)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
