"""UNet step time without a LoRA and with a merged one, alternating, in one process.

    python benchmarks/lora_step.py                   # SD 1.5 UNet architecture, 256 px, batch 2
    python benchmarks/lora_step.py --model tiny      # the tiny test model (seconds)

A LoRA is merged into the weights (`diffusion_tf.lora.LoraStack`): the network that runs is the
same, only its variables' values differ, so the step time should not change (ratio ~1.00). The
UNet has random weights (the time does not depend on them); the LoRA is a kohya file written here
with rank --rank factors for every attention and feed-forward linear and proj_in/proj_out. Rounds
alternate: unload, time --steps calls; load the LoRA, time --steps calls. The compiled function
(graph mode, or XLA with --xla) is traced once and never again (checked).

Results: benchmarks/results/lora-step-<date>-<model>-<size>.json and the ratio on stdout.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_lora(unet, path, rank):
    from safetensors.numpy import save_file

    from diffusion_tf.lora.keys import ModuleIndex
    import numpy as np

    index = ModuleIndex("unet", unet)
    rng = np.random.default_rng(0)
    tensors = {}
    for module in index.variables:
        if "transformer_blocks" not in module and not module.endswith(("proj_in", "proj_out")):
            continue
        shape = index.torch_shape(module)
        name = "lora_unet_" + module.replace(".", "_")
        kernel = tuple(shape[2:])
        tensors[name + ".lora_down.weight"] = (rng.standard_normal((rank, shape[1]) + kernel) * 0.01).astype("float32")
        tensors[name + ".lora_up.weight"] = (rng.standard_normal((shape[0], rank) + ((1, 1) if kernel else ()))
                                             * 0.01).astype("float32")
        tensors[name + ".alpha"] = np.array(rank / 2, dtype="float32")
    save_file(tensors, path)
    return len(tensors) // 3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd-v1-5", "tiny"], default="sd-v1-5")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; tiny: 64)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed UNet calls per round and configuration")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--xla", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    import diffusion_tf  # noqa: F401  first: its TensorFlow environment defaults (runtime.py)
    import tensorflow as tf

    from diffusion_tf import runtime
    from diffusion_tf.components import build_model
    from diffusion_tf.lora import LoraStack

    if args.model == "tiny":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from support import tiny_models
        from weights_port.convert import folder_configs

        config = folder_configs(tiny_models.fixture_dir("tiny-sd1"))["unet"]
        size = args.size or 64
    else:
        from diffusion_tf import presets

        config = presets.get_preset("sd-v1-5")["configs"]["unet"]
        size = args.size or 256
    unet = build_model("unet", config)
    runtime.apply()
    rng = np.random.default_rng(0)
    side = size // 8
    x = tf.constant(rng.standard_normal((2, side, side, 4)).astype("float32"))
    t = tf.constant([500.0, 500.0])
    ctx = tf.constant(rng.standard_normal((2, 77, unet.cross_attention_dim)).astype("float32"))
    step = tf.function(lambda: unet(x, t, ctx), jit_compile=args.xla)

    stack = LoraStack({"unet": unet})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.safetensors")
        modules = write_lora(unet, path, args.rank)
        t0 = time.perf_counter()
        base_out = step().numpy()
        first = time.perf_counter() - t0
        times = {"none": [], "lora": []}
        load_s, outputs_differ = [], None
        for _ in range(args.rounds):
            stack.unload_all()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step().numpy()
                times["none"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stack.load(path, 1.0)
            load_s.append(time.perf_counter() - t0)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                out = step().numpy()
                times["lora"].append(time.perf_counter() - t0)
            outputs_differ = float(np.abs(out - base_out).max())
        stack.unload_all()
        restored = bool(np.array_equal(step().numpy(), base_out))
    traces = int(step.experimental_get_tracing_count())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": datetime.date.today().isoformat(), "model": args.model, "size": size, "batch": 2, "xla": args.xla,
        "rank": args.rank, "lora_modules": modules, "rounds": args.rounds, "steps_per_round": args.steps,
        "median_s": med, "min_s": {k: min(v) for k, v in times.items()}, "times_s": times,
        "ratio_lora_over_none": med["lora"] / med["none"], "first_call_s": first,
        "load_median_s": statistics.median(load_s), "traces": traces, "max_output_change": outputs_differ,
        "unload_restores_output_bit_for_bit": restored, "cpus": os.cpu_count(),
    }
    out_path = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"lora-step-{result['date']}-{args.model}-{size}{'-xla' if args.xla else ''}.json")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"UNet step ({args.model}, {size} px, batch 2): no LoRA {med['none'] * 1000:.1f} ms, merged LoRA "
          f"(rank {args.rank}, {modules} modules) {med['lora'] * 1000:.1f} ms: ratio {result['ratio_lora_over_none']:.3f}; "
          f"load {result['load_median_s']:.2f} s; traced {traces}x; unload exact: {restored}. -> {out_path}")


if __name__ == "__main__":
    main()
