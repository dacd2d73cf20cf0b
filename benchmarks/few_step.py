"""Few-step whole generations at 512x512 against diffusers with the same configuration, same run.

    pip install torch==2.13.0 diffusers transformers
    python benchmarks/few_step.py                      # both recipes, 1 alternating round
    python benchmarks/few_step.py --recipes turbo --rounds 2

Recipes (random weights, fp32, the full-size architectures):
- turbo: SD-Turbo's (SD 2.1-base networks, sd-turbo preset), 1 step of Euler ancestral over
  trailing timesteps, guidance 0 (one UNet pass), decoded by TAESD (AutoencoderTiny's default
  config). diffusers: StableDiffusionPipeline with EulerAncestralDiscreteScheduler
  (timestep_spacing="trailing") and pipe.vae = AutoencoderTiny.
- lcm: a guidance-distilled SD 1.5 UNet (time_cond_proj_dim=256, as LCM-Dreamshaper), 4 steps of
  `lcm` at guidance 8.5 (an input, no unconditional pass), the full VAE. diffusers:
  LatentConsistencyModelPipeline.

How it measures: one folder of random weights per recipe is written by diffusers (in a process
of its own) and converted by `python -m weights_port` (and `--vae` for TAESD). Every
implementation runs in a fresh process: load, a first generation (with tracing and XLA
compilation: "first"), a second ("second"), its peak RSS (VmHWM). Implementations alternate
within a round. Ours: graph mode and XLA (`--impls`). Results: benchmarks/results/few_step.json
and a Markdown table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photograph of an astronaut riding a horse"

WRITE = r'''
import json, os, sys
import torch, diffusers, transformers
sys.path.insert(0, sys.argv[3])
recipe, folder = sys.argv[1], sys.argv[2]
from diffusion_tf.presets import registry
from diffusion_tf.clip_tokenizer import CLIPTokenizer
torch.manual_seed(0)
configs = registry.get_preset("sd-turbo" if recipe == "turbo" else "sd-v1-5")["configs"]
clean = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
unet_cfg = dict(configs["unet"])
if recipe == "lcm":
    unet_cfg["time_cond_proj_dim"] = 256
unet = diffusers.UNet2DConditionModel(**unet_cfg).eval()
vae = diffusers.AutoencoderKL(**configs["vae"]).eval()
te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).eval()
vocab, merges = CLIPTokenizer().save_vocabulary(os.path.join(folder, "tok"))
pad = "!" if configs["tokenizer"]["pad_token_id"] == 0 else "<|endoftext|>"
tok = transformers.CLIPTokenizer(vocab, merges, pad_token=pad, model_max_length=77)
sched_cfg = clean(configs["scheduler"])
if recipe == "turbo":
    sched = diffusers.EulerAncestralDiscreteScheduler(**{k: v for k, v in sched_cfg.items() if k != "set_alpha_to_one"})
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    diffusers.AutoencoderTiny().eval().save_pretrained(os.path.join(folder, "taesd"), safe_serialization=True)
else:
    sched = diffusers.LCMScheduler(**{k: v for k, v in sched_cfg.items() if k != "steps_offset"})
    pipe = diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(os.path.join(folder, "diffusers"), safe_serialization=True)
'''

RUN = r'''
import json, os, sys, time
impl, recipe, folder, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from benchmarks.peak_memory import peak_rss_gib
PROMPT = sys.argv[6]
steps, guidance = (1, 0.0) if recipe == "turbo" else (4, 8.5)
t0 = time.perf_counter()
if impl.startswith("ours"):
    import diffusion_tf  # first: its TensorFlow environment defaults (runtime.py)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from diffusion_tf import Text2Image
    vae = os.path.join(folder, "ours-taesd") if recipe == "turbo" else None
    t2i = Text2Image(model=os.path.join(folder, "ours"), img_height=512, img_width=512, vae=vae,
                     jit_compile=impl == "ours-xla", scheduler="euler_a" if recipe == "turbo" else "lcm")
    run = lambda: t2i.generate(PROMPT, num_steps=steps, seed=0, unconditional_guidance_scale=guidance)
else:
    import torch, diffusers
    torch.set_num_threads(threads)
    cls = diffusers.StableDiffusionPipeline if recipe == "turbo" else diffusers.LatentConsistencyModelPipeline
    pipe = cls.from_pretrained(os.path.join(folder, "diffusers"), safety_checker=None, requires_safety_checker=False)
    if recipe == "turbo":
        pipe.vae = diffusers.AutoencoderTiny.from_pretrained(os.path.join(folder, "taesd")).eval()
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)
    def run():
        with torch.inference_mode():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=512, width=512,
                        generator=g(), output_type="np").images
load = time.perf_counter() - t0
t0 = time.perf_counter(); run(); first = time.perf_counter() - t0
t0 = time.perf_counter(); run(); second = time.perf_counter() - t0
print(json.dumps({"load_s": load, "first_s": first, "second_s": second, "peak_rss_gib": peak_rss_gib()}))
'''


def _run(args, what):
    done = subprocess.run([sys.executable, "-c"] + args, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def prepare(recipe, folder):
    if not os.path.isdir(os.path.join(folder, "diffusers")):
        print(f"writing the {recipe} reference folder ...", file=sys.stderr, flush=True)
        _run([WRITE, recipe, folder, ROOT], f"writing {recipe}")
    if not os.path.isdir(os.path.join(folder, "ours")):
        print(f"converting the {recipe} folder ...", file=sys.stderr, flush=True)
        _weights_port([os.path.join(folder, "diffusers"), os.path.join(folder, "ours")], f"converting {recipe}")
    if recipe == "turbo" and not os.path.isdir(os.path.join(folder, "ours-taesd")):
        _weights_port(["--vae", os.path.join(folder, "taesd"), os.path.join(folder, "ours-taesd")], "converting TAESD")


def _weights_port(args, what):
    """`python -m weights_port ARGS` in a fresh process (the checkout's, whatever the cwd)."""
    _run(["import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.argv = ['weights_port'] + sys.argv[2:]; "
          "runpy.run_module('weights_port', run_name='__main__')", ROOT] + args, what)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["turbo", "lcm"], choices=["turbo", "lcm"])
    p.add_argument("--impls", nargs="+", default=["ours-xla", "diffusers"],
                   choices=["ours-graph", "ours-xla", "diffusers"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--folder", default=None, help="where the random-weight folders are written (reused)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "few_step.json"))
    args = p.parse_args(argv)
    root = args.folder or tempfile.mkdtemp(prefix="few_step_")
    results = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(), "threads": args.threads},
               "rounds": {}}
    for recipe in args.recipes:
        folder = os.path.join(root, recipe)
        os.makedirs(folder, exist_ok=True)
        prepare(recipe, folder)
        for r in range(args.rounds):
            for impl in args.impls:
                out = json.loads(_run([RUN, impl, recipe, folder, str(args.threads), ROOT, PROMPT],
                                      f"{recipe} {impl}").strip().splitlines()[-1])
                results["rounds"].setdefault(recipe, {}).setdefault(impl, []).append(out)
                print(f"  {recipe} round {r + 1}: {impl} " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()),
                      file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    lines = ["| recipe | implementation | second run s | first run s | load s | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for recipe, impls in results["rounds"].items():
        for impl, runs in impls.items():
            best = min(runs, key=lambda x: x["second_s"])
            lines.append(f"| {recipe} | {impl} | {best['second_s']:.2f} | {best['first_s']:.2f} | "
                         f"{best['load_s']:.1f} | {best['peak_rss_gib']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
