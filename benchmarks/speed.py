"""Speed against the reference, measured in the same run: diffusion_tf (eager, graph, XLA) vs
diffusers (eager; torch.compile when asked), the SD v1.5 networks with the SAME random weights.

    pip install torch==2.13.0 diffusers transformers
    python benchmarks/speed.py                                  # UNet, VAE decode, text encoder
    python benchmarks/speed.py --parts unet --sizes 256 512 --repeats 5
    python benchmarks/speed.py --parts generate --sizes 512     # a whole 20-step DPM-Solver++ 2M generation
    pip install openvino                                        # the CPU peer (benchmark-only)
    python benchmarks/speed.py --parts unet vae --impls ours-xla diffusers openvino

How it measures:
- the diffusers/transformers networks are built from the preset's configs with
  torch.manual_seed(0); their state dicts are assigned to ours by name, as `weights_port`
  does for a diffusers folder (`diffusion_tf.state_dict.set_state_dict`), and the outputs
  are compared (the relative error is printed with the timings);
- every implementation first runs once (its compile time is that first call minus the
  median); then the repeats ALTERNATE between implementations (ours-eager, ours-graph,
  ours-xla, diffusers, ...), so that a change in machine load hits them all alike;
- `--impls openvino`: OpenVINO runs the same diffusers modules (same random weights), converted
  with `openvino.convert_model` from a trace at the case's input shapes and compiled for the CPU
  with `INFERENCE_PRECISION_HINT=f32`, `INFERENCE_NUM_THREADS=--threads` and the latency hint;
  its convert + compile time is reported apart (`convert_s`) and its error against diffusers
  with the others'. It alternates with the others like any implementation;
- fp32, the UNet at batch 2 (classifier-free guidance), VAE decode and text encoder at
  batch 1; TensorFlow and PyTorch both get `--threads` threads (default: every core);
- reports median / min / max seconds and the ratio of each median to diffusers eager's;
- the glibc heap: unless DIFFUSION_TF_KEEP_HEAP=0, our networks keep large freed blocks
  between calls (`diffusion_tf.compiler_memory.keep_large_blocks`, applied by
  `diffusion_tf.runtime.apply()` once their weights are in place); diffusers runs with glibc's
  thresholds, as its users get it, and `--impls diffusers-keep-heap` adds diffusers with our
  setting. The setting is process-wide, so before each call the heap is switched to that
  implementation's mode (glibc's defaults as the 32 MiB mmap / 64 MiB trim thresholds its own
  adaptation reaches at most). After diffusers' turn, our next call may fault part of its
  temporaries in again: that counts against us.
  Peak resident memory is per process, so `--parts generate` runs each implementation's whole
  generation in a fresh process and reports its peak RSS (VmHWM: not ru_maxrss, which a child
  inherits from its parent; `benchmarks/peak_memory.py`).

Results go to benchmarks/results/speed-<parts>.json and a Markdown table on stdout;
benchmarks/README.md keeps the latest table with the machine it ran on.
"""

import argparse
import gc
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
from benchmarks.peak_memory import peak_rss_gib  # noqa: E402
PROMPT = "a photograph of an astronaut riding a horse"


def _configure_threads(threads):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import diffusion_tf  # noqa: F401  first: its TensorFlow environment defaults (runtime.py)
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(threads)


def reference_models(configs, parts):
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    out = {}
    if {"unet", "generate"} & parts:
        out["unet"] = diffusers.UNet2DConditionModel(**configs["unet"]).eval()
    if {"vae", "generate"} & parts:
        out["vae"] = diffusers.AutoencoderKL(**configs["vae"]).eval()
    if {"text", "generate"} & parts:
        out["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).eval()
    return out


def our_models(configs, reference):
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import set_state_dict

    out = {}
    for name, ref in reference.items():
        model = build_model(name, configs[name])
        state = {k: v.detach().numpy() for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        if name == "text_encoder":  # transformers 5 names them without the checkpoints' prefix
            state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
        set_state_dict(model, state, source=f"diffusers {name}")
        out[name] = model
    from diffusion_tf import runtime

    runtime.apply()  # the heap setting, as `load_folder` applies it: after the weights are in place
    return out


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def openvino_variant(module, call, example, threads, converts):
    """`call(module, *example)` (a torch module) converted to OpenVINO and compiled for the CPU,
    fp32, with `threads` threads: -> a callable returning a torch tensor (NCHW, as diffusers').
    Its convert + compile seconds are appended to `converts`."""
    import openvino as ov
    import torch

    class Wrapped(torch.nn.Module):  # the module as a submodule: its weights trace as parameters
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return call(self.module, *args)

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(Wrapped().eval(), example_input=example)
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})
    converts.append(time.perf_counter() - t0)
    request = compiled.create_infer_request()
    inputs = [e.numpy() for e in example]

    def run():
        request.infer(inputs)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def cases(parts, sizes, configs, ref, ours, impls, compile_torch, threads=None):
    """({case name: {impl: callable}}, {case name: openvino's convert + compile seconds})."""
    import tensorflow as tf
    import torch

    rng = np.random.default_rng(0)
    out = {}
    convert_s = {}
    threads = threads or os.cpu_count()

    def openvino_variants(name, module, call, example):
        if "openvino" not in impls:
            return {}
        converts = []
        fn = openvino_variant(module, call, example, threads, converts)
        convert_s[name] = converts[0]
        print(f"  {name}: openvino convert + compile {converts[0]:.1f} s", file=sys.stderr, flush=True)
        return {"openvino": fn}

    def ours_variants(fn):
        variants = {}
        if "ours-eager" in impls:
            variants["ours-eager"] = fn
        if "ours-graph" in impls:
            variants["ours-graph"] = tf.function(fn)
        if "ours-xla" in impls:
            variants["ours-xla"] = tf.function(fn, jit_compile=True)
        return variants

    def torch_variants(fn):
        variants = {}
        if "diffusers" in impls:
            variants["diffusers"] = fn
        if "diffusers-keep-heap" in impls:
            variants["diffusers-keep-heap"] = fn
        if compile_torch:
            variants["diffusers-compile"] = torch.compile(fn)
        return variants

    ctx_dim = configs["unet"]["cross_attention_dim"]
    # Every closure binds its own size's inputs (default arguments): a plain closure would read
    # the loop's last inputs, so every size would run at the largest.
    for size in sizes:
        side = size // 8
        if "unet" in parts:
            x = rng.standard_normal((2, side, side, 4), np.float32)
            t = np.array([500.0, 500.0], np.float32)
            ctx = rng.standard_normal((2, 77, ctx_dim), np.float32)
            xt, tt, ct = tf.constant(x), tf.constant(t), tf.constant(ctx)
            tx, ttt, tc = _nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)
            fns = ours_variants(lambda xt=xt, tt=tt, ct=ct: ours["unet"](xt, tt, ct))
            unet = ref["unet"]
            fns.update(torch_variants(lambda tx=tx, ttt=ttt, tc=tc: unet(tx, ttt, encoder_hidden_states=tc).sample))
            name = f"UNet step, {size} px, batch 2"
            fns.update(openvino_variants(name, unet, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample,
                                         (tx, ttt, tc)))
            out[name] = fns
        if "vae" in parts:
            z = rng.standard_normal((1, side, side, 4), np.float32)
            zt, tz = tf.constant(z), _nchw(z)
            fns = ours_variants(lambda zt=zt: ours["vae"].decode(zt))
            vae = ref["vae"]
            fns.update(torch_variants(lambda tz=tz: vae.decode(tz).sample))
            name = f"VAE decode, {size} px, batch 1"
            fns.update(openvino_variants(name, vae, lambda m, z: m.decode(z).sample, (tz,)))
            out[name] = fns
    if "text" in parts:
        from diffusion_tf.clip_tokenizer import CLIPTokenizer

        ids = np.asarray(CLIPTokenizer()([PROMPT]), np.int32)
        it, ti = tf.constant(ids), torch.from_numpy(ids.astype(np.int64))
        fns = ours_variants(lambda: ours["text_encoder"](it))
        te = ref["text_encoder"]
        fns.update(torch_variants(lambda: te(ti).last_hidden_state))
        name = "text encoder, 77 tokens, batch 1"
        fns.update(openvino_variants(name, te, lambda m, i: m(i).last_hidden_state, (ti,)))
        out[name] = fns
    return out, convert_s


def to_numpy(y):
    import torch

    if isinstance(y, torch.Tensor):
        y = y.detach().numpy()
        return np.transpose(y, (0, 2, 3, 1)) if y.ndim == 4 else y
    return np.asarray(y)


def set_heap_mode(impl):
    """glibc's heap thresholds for `impl` (see the module docstring): kept large blocks for
    ours and diffusers-keep-heap, glibc's defaults (at their adaptive maximum) for the others."""
    from diffusion_tf import compiler_memory as cm

    if cm.MALLOPT is None or not cm.large_blocks_kept():
        return
    keep = impl.startswith("ours") or impl == "diffusers-keep-heap"
    cm.MALLOPT(cm.M_MMAP_THRESHOLD, cm.KEEP_BYTES if keep else 32 * 2**20)
    cm.MALLOPT(cm.M_TRIM_THRESHOLD, cm.KEEP_BYTES if keep else 64 * 2**20)


def measure(all_cases, repeats, convert_s=None):
    import torch

    results = {}
    convert_s = convert_s or {}
    for name, fns in all_cases.items():
        first, outputs = {}, {}
        for impl, fn in fns.items():
            gc.collect()
            set_heap_mode(impl)
            t0 = time.perf_counter()
            with torch.inference_mode():
                outputs[impl] = to_numpy(fn())
            first[impl] = time.perf_counter() - t0
            print(f"  {name}: {impl} first call {first[impl]:.2f} s", file=sys.stderr, flush=True)
        times = {impl: [] for impl in fns}
        for r in range(repeats):
            for impl, fn in fns.items():
                set_heap_mode(impl)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn()
                times[impl].append(time.perf_counter() - t0)
            print(f"  {name}: repeat {r + 1}/{repeats}: "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), file=sys.stderr, flush=True)
        ref = outputs.get("diffusers")
        entry = {}
        for impl in fns:
            med = statistics.median(times[impl])
            e = {"median_s": med, "min_s": min(times[impl]), "max_s": max(times[impl]),
                 "first_call_s": first[impl], "compile_s": max(0.0, first[impl] - med)}
            if ref is not None and not impl.startswith("diffusers"):
                err = float(np.abs(outputs[impl] - ref).max())
                e["max_abs_error_vs_diffusers"] = err
                e["relative_error_vs_diffusers"] = err / max(float(np.abs(ref).max()), 1.0)
            if impl == "openvino":
                e["convert_s"] = convert_s.get(name)
            entry[impl] = e
        if "diffusers" in entry:
            for e in entry.values():
                e["ratio_to_diffusers_eager"] = e["median_s"] / entry["diffusers"]["median_s"]
        results[name] = entry
    return results


# ------------------------------------------------------------------ whole generation
GENERATE_SCRIPT = r'''
import json, os, sys, time
impl, folder, size, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
from benchmarks.speed import _configure_threads, PROMPT
from benchmarks.peak_memory import peak_rss_gib
_configure_threads(threads)
import numpy as np
if impl.startswith("ours"):
    from diffusion_tf import Text2Image
    t2i = Text2Image(model=os.path.join(folder, "ours"), img_height=size, img_width=size,
                     jit_compile=impl == "ours-xla", scheduler="dpm++2m")
    run = lambda: t2i.generate(PROMPT, num_steps=steps, seed=0, unconditional_guidance_scale=7.5)
else:
    import torch, diffusers
    if impl == "diffusers-keep-heap":
        from diffusion_tf import compiler_memory
        compiler_memory.keep_large_blocks()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(os.path.join(folder, "diffusers"), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)
    run = lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=g(),
                       output_type="np").images
t0 = time.perf_counter(); run(); first = time.perf_counter() - t0
t0 = time.perf_counter(); run(); second = time.perf_counter() - t0
print(json.dumps({"first_s": first, "second_s": second,
                  "peak_rss_gib": peak_rss_gib()}))
'''


def write_pipeline_folders(configs, ref, ours, folder):
    """A diffusers pipeline folder and our model folder holding the same random weights."""
    import diffusers
    import transformers

    from diffusion_tf import presets
    from diffusion_tf.model_folder import write_folder

    preset = presets.get_preset("sd-v1-5")
    scheduler_cfg = dict(preset["configs"]["scheduler"])
    from diffusion_tf.clip_tokenizer import CLIPTokenizer

    vocab, merges = CLIPTokenizer().save_vocabulary(os.path.join(folder, "tok"))
    tokenizer = transformers.CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>", model_max_length=77)
    pipe = diffusers.StableDiffusionPipeline(
        vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=tokenizer, unet=ref["unet"],
        scheduler=diffusers.DDIMScheduler(**{k: v for k, v in scheduler_cfg.items() if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(os.path.join(folder, "diffusers"), safe_serialization=True)
    config = {name: {k: v for k, v in m.get_config().items() if k not in ("name", "trainable", "dtype")}
              for name, m in ours.items()}
    config.update(scheduler=scheduler_cfg, tokenizer=preset["configs"]["tokenizer"], source="benchmarks/speed.py")
    write_folder(os.path.join(folder, "ours"), config, ours, overwrite=True)


def measure_generation(impls, sizes, steps, threads, folder):
    out = {}
    for size in sizes:
        for impl in impls:
            proc = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, impl, folder, str(size), str(steps),
                                   str(threads), ROOT], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            name = f"generation, {size} px, {steps} DPM-Solver++ 2M steps"
            out.setdefault(name, {})[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {name}: {impl} {out[name][impl]}", file=sys.stderr, flush=True)
    return out


def add_sum_of_parts(timings, sizes, steps):
    """Next to each whole generation: text encoder (twice: prompt and negative) + steps x UNet
    step + VAE decode of the same implementation measured in this run, and the overhead."""
    for size in sizes:
        gen = timings.get(f"generation, {size} px, {steps} DPM-Solver++ 2M steps", {})
        for impl, e in gen.items():
            try:
                unet = timings[f"UNet step, {size} px, batch 2"][impl]["median_s"]
                vae = timings[f"VAE decode, {size} px, batch 1"][impl]["median_s"]
                text = timings["text encoder, 77 tokens, batch 1"][impl]["median_s"]
            except KeyError:
                continue
            e["sum_of_parts_s"] = 2 * text + steps * unet + vae
            e["overhead_vs_parts"] = e["second_s"] / e["sum_of_parts_s"] - 1


def table(results):
    lines = ["| case | implementation | median s | min | max | compile s | x diffusers eager | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    gens = []
    for name, entry in results.items():
        for impl, e in entry.items():
            if "second_s" in e:
                gens.append((name, impl, e))
            if "median_s" not in e:
                continue
            ratio = e.get("ratio_to_diffusers_eager")
            err = e.get("relative_error_vs_diffusers")
            lines.append(f"| {name} | {impl} | {e['median_s']:.3f} | {e['min_s']:.3f} | {e['max_s']:.3f} | "
                         f"{e['compile_s'] + (e.get('convert_s') or 0):.1f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                         f"{'' if err is None else f'{err:.1e}'} |")
    if gens:
        lines += ["", "| generation | implementation | seconds (2nd run) | first run (with compile) | peak RSS GiB |"
                  " sum of parts s | overhead |", "|---|---|---|---|---|---|---|"]
        for name, impl, e in gens:
            parts = e.get("sum_of_parts_s")
            lines.append(f"| {name} | {impl} | {e['second_s']:.1f} | {e['first_s']:.1f} | {e['peak_rss_gib']:.2f} | "
                         f"{'' if parts is None else f'{parts:.1f}'} | "
                         f"{'' if parts is None else format(100 * e['overhead_vs_parts'], '+.1f') + '%'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["unet", "vae", "text"], choices=["unet", "vae", "text", "generate"])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--impls", nargs="+", default=["ours-eager", "ours-graph", "ours-xla", "diffusers"])
    p.add_argument("--compile-torch", action="store_true", help="also diffusers under torch.compile (minutes to compile)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="denoising steps of --parts generate")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--folder", default=None, help="where --parts generate writes the two model folders")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from diffusion_tf import runtime

    if "diffusers-keep-heap" in args.impls and not runtime.options().keep_heap:
        # With the setting turned off this row would silently be plain diffusers.
        p.error("--impls diffusers-keep-heap compares the heap setting that DIFFUSION_TF_KEEP_HEAP=0 turns off")
    _configure_threads(args.threads)
    import diffusers
    import tensorflow as tf
    import torch

    from diffusion_tf import presets

    configs = presets.get_preset("sd-v1-5")["configs"]
    parts = set(args.parts)
    t0 = time.time()
    reuse = (parts == {"generate"} and args.folder
             and all(os.path.isdir(os.path.join(args.folder, d)) for d in ("diffusers", "ours")))
    if not reuse:
        ref = reference_models(configs, parts)
        ours = our_models(configs, ref)
        print(f"built and ported the networks in {time.time() - t0:.0f} s", file=sys.stderr)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "threads": args.threads},
        "versions": {"tensorflow": tf.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "repeats": args.repeats,
    }
    if "openvino" in args.impls:
        import openvino

        results["versions"]["openvino"] = openvino.__version__
    timings = {}
    if not reuse:
        all_cases, convert_s = cases(parts, args.sizes, configs, ref, ours, args.impls, args.compile_torch,
                                     args.threads)
        timings = measure(all_cases, args.repeats, convert_s)
    if "generate" in parts:
        import tempfile

        folder = args.folder or tempfile.mkdtemp(prefix="speed_")
        if not reuse:  # --parts generate alone with a --folder written by an earlier run: reuse it
            write_pipeline_folders(configs, ref, ours, folder)
            del ref, ours
            gc.collect()
        impls = [i for i in args.impls if i in ("ours-graph", "ours-xla", "diffusers", "diffusers-keep-heap")]
        timings.update(measure_generation(impls, args.sizes, args.steps, args.threads, folder))
        add_sum_of_parts(timings, args.sizes, args.steps)
    results["timings"] = timings
    results["peak_rss_gib_this_process"] = peak_rss_gib()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"speed-{'-'.join(sorted(parts))}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)
    print(table(timings))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
