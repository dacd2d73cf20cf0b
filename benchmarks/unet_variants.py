"""UNet step time and peak memory by image size, attention type and dtype policy.

    python benchmarks/unet_variants.py                                   # the LinearAttention table
    python benchmarks/unet_variants.py --sizes 512 --dtypes float32 mixed_bfloat16 mixed_float16

The SD v1.5 UNet (random weights: speed and memory do not depend on them), batch 2 (guidance),
one fresh process per (size, attention, dtype) so that each peak resident memory (VmHWM,
`benchmarks/peak_memory.py`) is that configuration's own: build, first call (XLA compile
unless --no-xla), then --repeats timed calls. Standard attention above 256 MiB of scores is
computed in chunks of queries (diffusion_tf.layers.attention.MAX_SCORE_BYTES), so 1024 px runs
in 24 GiB.

Results: benchmarks/results/unet-variants.json and a Markdown table on stdout.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE = r'''
import json, os, statistics, sys, time
size, attention, dtype, repeats, xla, threads = (int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                 sys.argv[5] == "1", int(sys.argv[6]))
sys.path.insert(0, sys.argv[7])
from benchmarks.peak_memory import peak_rss_gib
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(1)
from diffusion_tf import presets
from diffusion_tf.components import build_model
config = dict(presets.get_preset("sd-v1-5")["configs"]["unet"], attention=attention)
unet = build_model("unet", config, dtype=dtype)
from diffusion_tf import runtime
runtime.apply()  # the heap setting, as components.load_folder applies it for use
rng = np.random.default_rng(0)
side = size // 8
x = tf.constant(rng.standard_normal((2, side, side, 4)).astype("float32"))
t = tf.constant([500.0, 500.0])
ctx = tf.constant(rng.standard_normal((2, 77, 768)).astype("float32"))
step = tf.function(lambda: unet(x, t, ctx), jit_compile=xla)
t0 = time.perf_counter(); out = step().numpy(); first = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step().numpy(); times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(json.dumps({"median_s": med, "min_s": min(times), "max_s": max(times), "compile_s": max(0.0, first - med),
                  "finite": bool(np.isfinite(out).all()),
                  "peak_rss_gib": peak_rss_gib()}))
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 768, 1024])
    p.add_argument("--attentions", nargs="+", default=["standard", "linear"], choices=["standard", "linear"])
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   choices=["float32", "mixed_bfloat16", "mixed_float16", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-xla", action="store_true", help="graph mode instead of XLA")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "unet-variants.json"))
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            for attention in args.attentions:
                proc = subprocess.run(
                    [sys.executable, "-c", ONE, str(size), attention, dtype, str(args.repeats),
                     "0" if args.no_xla else "1", str(args.threads), ROOT], capture_output=True, text=True)
                row = {"size": size, "attention": attention, "dtype": dtype, "xla": not args.no_xla}
                if proc.returncode != 0:
                    row["error"] = proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else str(proc.returncode)
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(f"  {row}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"threads": args.threads, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("| px | dtype | attention | step s (median) | compile s | peak RSS GiB | linear speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['size']} | {row['dtype']} | {row['attention']} | failed: {row['error']} | | | |")
            continue
        std = next((r for r in rows if r["size"] == row["size"] and r["dtype"] == row["dtype"]
                    and r["attention"] == "standard" and "median_s" in r), None)
        speedup = f"{std['median_s'] / row['median_s']:.2f}x" if row["attention"] == "linear" and std else ""
        print(f"| {row['size']} | {row['dtype']} | {row['attention']} | {row['median_s']:.2f} | {row['compile_s']:.0f} | "
              f"{row['peak_rss_gib']:.1f} | {speedup} |")


if __name__ == "__main__":
    main()
