#!/usr/bin/env python
"""Copy a trained shapes model into the package, where it is the built-in default model.

    python -m diffusion_tf.train --save runs/shapes --jit-compile --gif
    python scripts/ship_shapes_model.py runs/shapes

Copies config.json and the three weight files of the model folder written by
`diffusion_tf.train` to diffusion_tf/data/shapes_model/ (atomically: a temporary
folder, then a rename), sets the config's "defaults" section to
`diffusion_tf.training.options.GENERATION_DEFAULTS`, drops the absolute training paths from it,
and refuses a model over the 16 MB budget.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "diffusion_tf", "data", "shapes_model")
FILES = ("config.json", "text_encoder.weights.h5", "unet.weights.h5", "vae.weights.h5")
MAX_BYTES = 16 * 1000 * 1000


def main(argv=None):
    sys.path.insert(0, ROOT)
    from diffusion_tf.training.options import GENERATION_DEFAULTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="the --save folder of a finished `python -m diffusion_tf.train` run")
    args = p.parse_args(argv)
    missing = [f for f in FILES if not os.path.isfile(os.path.join(args.folder, f))]
    if missing:
        p.exit(2, f"{args.folder}: not a finished training run (missing {', '.join(missing)})\n")
    size = sum(os.path.getsize(os.path.join(args.folder, f)) for f in FILES)
    if size > MAX_BYTES:
        p.exit(2, f"{args.folder}: the model is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget\n")
    with open(os.path.join(args.folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["defaults"] = dict(GENERATION_DEFAULTS)
    options = config.get("training", {}).get("options", {})
    for key in ("save", "vae"):
        if options.get(key):
            options[key] = os.path.basename(os.path.normpath(options[key]))
    tmp = DEST + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in FILES[1:]:
        shutil.copyfile(os.path.join(args.folder, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    old = DEST + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(DEST):
        os.rename(DEST, old)
    os.rename(tmp, DEST)
    shutil.rmtree(old, ignore_errors=True)
    print(f"shipped {args.folder} -> {DEST} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
