#!/usr/bin/env python
"""Seconds per 64x64 image of the built-in shapes model, after compilation.

    python benchmarks/shapes_model_speed.py [--model shapes] [--repeats 5]

Batch 1 (one prompt; classifier-free guidance batches the conditional and unconditional
passes into one UNet call), the model's default steps, guidance and scheduler; for the
TensorFlow graph path and for XLA (`jit_compile=True`). The first call of each compiles
and is reported on its own; then the median/min/max of `--repeats` calls with new seeds.
Writes benchmarks/results/shapes_model_speed.json (atomically) and prints a table.
The issue's bar: under 2 s per image on 2 CPU cores.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shapes_model_speed.json"))
    args = p.parse_args(argv)

    import diffusion_tf  # noqa: F401  first: its TensorFlow environment defaults (runtime.py)
    import tensorflow as tf

    from diffusion_tf import Text2Image

    prompt = "a red circle on a blue background"
    results = {"model": args.model, "prompt": prompt, "machine": {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "tensorflow": tf.__version__}}
    for mode, jit in (("graph", False), ("xla", True)):
        t2i = Text2Image(model=args.model, jit_compile=jit)
        t0 = time.perf_counter()
        t2i.generate(prompt, seed=0)
        first = time.perf_counter() - t0
        times = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            t2i.generate(prompt, seed=k + 1)
            times.append(time.perf_counter() - t0)
        results[mode] = {"first_call_s": round(first, 3), "median_s": round(statistics.median(times), 4),
                         "min_s": round(min(times), 4), "max_s": round(max(times), 4), "repeats": args.repeats,
                         "steps": t2i.defaults["num_steps"], "guidance": t2i.defaults["guidance"],
                         "scheduler": t2i.scheduler.name}
        print(f"{mode:5s}: first call {first:.2f} s; then median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}) per image, {t2i.defaults['num_steps']} steps")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
