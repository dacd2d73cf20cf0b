"""What live previews cost: one process, the same generation three ways, alternating.

    python benchmarks/few_step.py --recipes lcm --folder /tmp/fs   # writes the model folder once
    python benchmarks/preview_overhead.py --folder /tmp/fs/lcm

- fused: no callback, the whole loop and the decode in one compiled function;
- stepwise: a callback after every step (what the command line's progress bar does);
- preview: the callback and a preview after every step (`Preview(1, sink)`, the latent-to-RGB map).

Reports the median seconds of each and the ratios preview / stepwise (the preview's own cost:
the command line) and preview / fused (what a library caller who asks for previews pays).
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="a few_step.py recipe folder (with ours/)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--xla", action="store_true")
    args = p.parse_args(argv)

    from diffusion_tf import Text2Image
    from diffusion_tf.pipeline.preview import Preview

    t2i = Text2Image(model=os.path.join(args.folder, "ours"), img_height=args.size, img_width=args.size,
                     jit_compile=args.xla)
    shown = []
    ways = {
        "fused": {},
        "stepwise": {"callback": lambda k, n, t: None},
        "preview": {"callback": lambda k, n, t: None,
                    "preview": Preview(args.every, lambda k, n, images: shown.append(images.shape))},
    }
    kw = dict(num_steps=args.steps, seed=0)
    for name, extra in ways.items():  # first calls: tracing and compilation
        t2i.generate("a red fox", **kw, **extra)
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, extra in ways.items():
            t0 = time.perf_counter()
            t2i.generate("a red fox", **kw, **extra)
            times[name].append(time.perf_counter() - t0)
        print("  " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"size": args.size, "steps": args.steps, "every": args.every, "xla": args.xla, "median_s": med,
           "times_s": times, "previews_per_run": len(shown) // (args.rounds + 1),
           "preview_over_stepwise": med["preview"] / med["stepwise"], "preview_over_fused": med["preview"] / med["fused"]}
    print(json.dumps(out, indent=1))
    path = os.path.join(ROOT, "benchmarks", "results", "preview_overhead.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
