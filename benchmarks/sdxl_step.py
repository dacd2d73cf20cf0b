"""SDXL UNet step against diffusers eager, measured in the same run, alternating.

    pip install torch==2.13.0 diffusers transformers
    python benchmarks/sdxl_step.py --sizes 512 1024 --repeats 3

The sdxl-base-1.0 UNet (2.6 B parameters, float32) at batch 2 (classifier-free guidance) with its
added conditions (pooled text embeddings and 6 time ids), random weights. One worker process per
implementation and round (ours: tf.function with XLA, as `jit_compile=True`; ours-graph: without
XLA; diffusers: eager), driven over a pipe, one alive at a time (each holds a 10 GB UNet: two
do not fit 24 GiB with their activations), the ROUNDS alternating between implementations so
that a change in machine load hits them alike: in each, every size runs once (ours: trace +
compile) and then `--repeats` timed steps. Both frameworks get every core. A worker's peak
resident memory (VmHWM) is its model plus its largest step. Results:
benchmarks/results/sdxl_step-<sizes>.json and a Markdown table on stdout.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PRESET = "sdxl-base-1.0"


def _inputs(size, unet_cfg):
    rng = np.random.default_rng(0)
    side = size // 8
    return dict(latents=rng.standard_normal((2, side, side, 4)).astype("float32"),
                timesteps=np.array([801, 801], "int32"),
                context=rng.standard_normal((2, 77, unet_cfg["cross_attention_dim"])).astype("float32"),
                text_embeds=rng.standard_normal((2, 1280)).astype("float32"),
                time_ids=np.array([[size, size, 0, 0, size, size]] * 2, "float32"))


def worker(impl, threads):
    """Reads sizes on stdin; for each, one call, answering {"seconds", "peak_rss_gib"} on stdout."""
    from benchmarks.peak_memory import peak_rss_gib
    from diffusion_tf.presets.registry import get_preset

    cfg = get_preset(PRESET)["configs"]["unet"]
    if impl.startswith("ours"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import diffusion_tf  # noqa: F401  first: its TensorFlow environment defaults (runtime.py)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from diffusion_tf import runtime
        from diffusion_tf.components import build_model

        unet = build_model("unet", cfg)
        runtime.apply()
        fn = tf.function(lambda x, t, c, e, i: unet(x, t, c, added_cond={"text_embeds": e, "time_ids": i}),
                         jit_compile=impl == "ours-xla")

        def step(inp):
            out = fn(inp["latents"], inp["timesteps"], inp["context"], inp["text_embeds"], inp["time_ids"])
            return np.asarray(out)
    else:
        import torch
        import diffusers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**cfg).eval()

        def step(inp):
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(inp["latents"].transpose(0, 3, 1, 2)))
                out = unet(x, torch.from_numpy(inp["timesteps"]).long(), torch.from_numpy(inp["context"]),
                           added_cond_kwargs={"text_embeds": torch.from_numpy(inp["text_embeds"]),
                                              "time_ids": torch.from_numpy(inp["time_ids"])}).sample
            return out.numpy()
    inputs = {}
    print(json.dumps({"ready": True, "peak_rss_gib": peak_rss_gib()}), flush=True)
    for line in sys.stdin:
        size = int(line)
        inputs.setdefault(size, _inputs(size, cfg))
        t0 = time.perf_counter()
        out = step(inputs[size])
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "finite": bool(np.isfinite(out).all()),
                          "peak_rss_gib": peak_rss_gib()}), flush=True)


class Worker:
    def __init__(self, impl, threads):
        self.impl = impl
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", impl,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.ready = self._answer()

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.impl}: the worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, size):
        self.proc.stdin.write(f"{size}\n")
        return self._answer()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--impls", nargs="+", default=["ours-xla", "diffusers"],
                   choices=["ours-xla", "ours-graph", "diffusers"])
    p.add_argument("--repeats", type=int, default=2, help="timed steps per size in each round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per implementation, alternating")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)

    results = {"preset": PRESET, "batch": 2, "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "sizes": {}}
    rows = {size: {impl: {"first_s": [], "times": [], "peak_rss_gib": 0.0} for impl in args.impls}
            for size in args.sizes}
    # One worker alive at a time (each holds a 10 GB UNet; two do not fit 24 GiB with their
    # activations): the ROUNDS alternate between implementations, each round a fresh process.
    for _ in range(args.rounds):
        for impl in args.impls:
            w = Worker(impl, args.threads)
            for size in args.sizes:
                r = rows[size][impl]
                r["first_s"].append(w.run(size)["seconds"])
                for _ in range(args.repeats):
                    answer = w.run(size)
                    r["times"].append(answer["seconds"])
                    r["finite"] = answer["finite"]
                r["peak_rss_gib"] = max(r["peak_rss_gib"], answer["peak_rss_gib"])
                print(json.dumps({"size": size, "impl": impl, **r}), flush=True)
            w.close()
    for size, row in rows.items():
        for r in row.values():
            r["median_s"] = statistics.median(r["times"])
            r["compile_s"] = statistics.median(r["first_s"]) - r["median_s"]
        ref = row.get("diffusers", {}).get("median_s")
        for r in row.values():
            r["x_diffusers"] = r["median_s"] / ref if ref else None
        results["sizes"][size] = row
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"sdxl_step-{'-'.join(map(str, args.sizes))}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print("| size | impl | median s (min-max) | x diffusers | compile s | peak RSS GiB |\n|---|---|---|---|---|---|")
    for size, row in results["sizes"].items():
        for impl, r in row.items():
            x = f"{r['x_diffusers']:.2f}" if r["x_diffusers"] else "-"
            print(f"| {size} | {impl} | {r['median_s']:.2f} ({min(r['times']):.2f}-{max(r['times']):.2f}) | {x} | "
                  f"{r['compile_s']:.1f} | {r['peak_rss_gib']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
