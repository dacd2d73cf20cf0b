"""Write the LCM fixtures: a tiny guidance-distilled model and an LCM-LoRA on tiny-sd1, with
diffusers' outputs (needs torch, diffusers, transformers; TensorFlow in a second process).

    pip install torch==2.13.0 diffusers==0.42.1 transformers
    python scripts/make_lcm_fixtures.py

tests/fixtures/tiny-lcm/ (spec "tiny-lcm" of tiny_specs.py: tiny-sd1 with time_cond_proj_dim=16 and
an LCMScheduler config): the configs (a diffusers folder without weights or vocabulary, as
make_parity_fixtures.py writes them; the tests recreate the weights from their keys) and
reference.npz:

    emb_w, emb_16, emb_7          diffusers' get_guidance_scale_embedding of the weights emb_w,
                                  dims 16 and 7 (odd: zero-padded)
    unet_latents, unet_timesteps, unet_context, unet_cond, unet_out
                                  the UNet with timestep_cond = emb_16 of w = (7.5, 0)
    <case>_latents, <case>_noise, <case>_image
                                  LatentConsistencyModelPipeline runs (CASES: prompts, steps,
                                  guidance, seed) from the given latents; <case>_noise [steps, B, h,
                                  w, 4] is the fresh noise of each LCM step, the very draws of
                                  diffusion_tf's pipeline for that seed (computed by TensorFlow in
                                  a subprocess, `our_step_noise`), given to diffusers' scheduler in
                                  place of its randn_tensor

tests/fixtures/lora/lcm_lora.safetensors: an LCM-LoRA-shaped file for tiny-sd1 (UNet only, PEFT keys
`unet.<module>.lora_A.weight` / `lora_B.weight` as diffusers saves them, no metadata, so alpha =
rank) on the modules LCM-LoRA adapts (diffusers' train_lcm_distill_lora_sd_wds.py targets:
attention q/k/v/out, proj_in/out, the feed-forward, resnet conv1/conv2/conv_shortcut/time_emb_proj,
the down/upsampler convs), rank LORA_RANK, float16; and lora/lcm_reference.npz with diffusers'
StableDiffusionPipeline + load_lora_weights + LCMScheduler / TCDScheduler (LORA_CASES) outputs
(`<case>_*` as above, plus unet_out: the tiny fixture's UNet inputs with the LoRA).

The float outputs of the networks reproduce to about 1e-6 across machines, not bit for bit (see
make_parity_fixtures.py).
"""

import json
import os
import subprocess
import sys
import tempfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import torch  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.schedulers import scheduling_lcm, scheduling_tcd  # noqa: E402

from make_lora_fixtures import build_pipeline, tiny_reference  # noqa: E402
from make_parity_fixtures import PROMPTS, clip_keys, load_random, nchw, nhwc, tokenizer_folder  # noqa: E402
from tiny_specs import LCM_SPECS  # noqa: E402

NAME = "tiny-lcm"
OUT = os.path.join(ROOT, "tests", "fixtures", NAME)
LORA_OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
LORA_FILE = "lcm_lora.safetensors"
LORA_RANK = 2
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
SIZE = 64
NEGATIVE = "blurry, low quality"
#: case -> prompts, steps, guidance, seed (diffusion_tf's `seed`: its step noise)
CASES = {
    "lcm4": dict(prompts=PROMPTS, steps=4, guidance=8.5, seed=11),
    "lcm2_w0": dict(prompts=PROMPTS[:1], steps=2, guidance=1.0, seed=12),
    # one step draws no noise: the case an XLA-compiled generation can match (XLA's stateless
    # normal draws differ from the graph's)
    "lcm1": dict(prompts=PROMPTS[:1], steps=1, guidance=8.5, seed=13),
}
#: case -> scheduler, steps, guidance, negative prompt or None, seed, diffusers step eta (TCD)
LORA_CASES = {
    "lora_lcm4": dict(scheduler="LCMScheduler", steps=4, guidance=1.0, negative=None, seed=21),
    "lora_lcm4_cfg": dict(scheduler="LCMScheduler", steps=4, guidance=2.0, negative=NEGATIVE, seed=22),
    "lora_tcd4": dict(scheduler="TCDScheduler", steps=4, guidance=1.0, negative=None, seed=23, eta=0.3),
}

OUR_NOISE = """
import sys
import numpy as np
import tensorflow as tf
from diffusion_tf import schedulers
from diffusion_tf.pipeline import sampling
seed, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
shape = [int(d) for d in sys.argv[3].split(",")]
s = schedulers.get("lcm")
s.set_timesteps(steps)
plan = sampling.Plan(s, seed=tf.constant(seed, "int64"), temperature=tf.constant(1.0))
x = tf.zeros(shape)
np.save(out, np.stack([np.asarray(sampling.step_noise(plan, x, i)) for i in range(steps)]))
"""


def our_step_noise(seed, steps, shape):
    """diffusion_tf's fresh noise of each step for `seed` (NHWC [steps, *shape]), from TensorFlow in its
    own process (PyTorch and TensorFlow are never imported into one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "noise.npy")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
        subprocess.run([sys.executable, "-c", OUR_NOISE, str(seed), str(steps), ",".join(map(str, shape)), out],
                       check=True, env=env, cwd=ROOT)
        return np.load(out)


class StepNoise:
    """Stands in for the schedulers' randn_tensor: the k-th call returns noise[k] (NCHW)."""

    def __init__(self, noise_nhwc):
        self.noise, self.k = noise_nhwc, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **kwargs):
        n = nchw(self.noise[self.k])
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        self.k += 1
        return n.to(dtype or torch.float32)


def with_noise(noise_nhwc, fn):
    saved = scheduling_lcm.randn_tensor, scheduling_tcd.randn_tensor
    patched = StepNoise(noise_nhwc)
    scheduling_lcm.randn_tensor = scheduling_tcd.randn_tensor = patched
    try:
        return fn()
    finally:
        scheduling_lcm.randn_tensor, scheduling_tcd.randn_tensor = saved
        # LCM draws before every step but the last; TCD too (gamma > 0)
        assert patched.k in (0, len(noise_nhwc) - 1), patched.k


def record(out, case, latents, noise, images):
    out[f"{case}_latents"], out[f"{case}_noise"] = latents, noise
    out[f"{case}_image"] = (images * 255).round().astype("uint8")


# ----------------------------------------------------------------------------- the distilled model
def make_distilled():
    spec = LCM_SPECS[NAME]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**spec["unet"]).eval()
    vae = diffusers.AutoencoderKL(**spec["vae"]).eval()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text_encoder"])).eval()
    scheduler = diffusers.LCMScheduler(**spec["scheduler"])
    load_random(unet)
    load_random(vae)
    load_random(text_encoder, clip_keys(text_encoder))
    for sub, obj in (("unet", unet), ("vae", vae)):
        obj.save_config(os.path.join(OUT, sub))
    scheduler.save_config(os.path.join(OUT, "scheduler"))
    os.makedirs(os.path.join(OUT, "text_encoder"), exist_ok=True)
    text_encoder.config.to_json_file(os.path.join(OUT, "text_encoder", "config.json"))
    os.makedirs(os.path.join(OUT, "tokenizer"), exist_ok=True)
    with open(os.path.join(OUT, "tokenizer", "special_tokens_map.json"), "w") as f:
        json.dump({"pad_token": spec["pad_token"]}, f)
    with open(os.path.join(OUT, "model_index.json"), "w") as f:
        json.dump({"_class_name": "LatentConsistencyModelPipeline"}, f)

    rng = np.random.default_rng(4321)
    ref = {}
    lat = spec["unet"]["sample_size"]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tokenizer_folder(tmp, spec["pad_token"])
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        dim = spec["unet"]["time_cond_proj_dim"]
        ref["emb_w"] = np.array([-1.0, 0.0, 0.5, 7.5], "float32")
        ref["emb_16"] = pipe.get_guidance_scale_embedding(torch.from_numpy(ref["emb_w"]), embedding_dim=dim).numpy()
        ref["emb_7"] = pipe.get_guidance_scale_embedding(torch.from_numpy(ref["emb_w"]), embedding_dim=7).numpy()

        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        ref["unet_latents"] = rng.standard_normal((2, lat, lat, 4)).astype("float32")
        ref["unet_timesteps"] = np.array([999, 259], "int32")
        ref["unet_context"] = text_encoder(torch.from_numpy(ids.astype("int64"))).last_hidden_state.numpy()
        ref["unet_cond"] = pipe.get_guidance_scale_embedding(torch.tensor([7.5, 0.0]), embedding_dim=dim).numpy()
        ref["unet_out"] = nhwc(unet(nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(),
                                    torch.from_numpy(ref["unet_context"]),
                                    timestep_cond=torch.from_numpy(ref["unet_cond"])).sample)

        for case, c in CASES.items():
            batch = len(c["prompts"])
            latents = rng.standard_normal((batch, lat, lat, 4)).astype("float32")
            noise = our_step_noise(c["seed"], c["steps"], (batch, lat, lat, 4))
            images = with_noise(noise, lambda: pipe(
                c["prompts"], num_inference_steps=c["steps"], guidance_scale=c["guidance"], height=SIZE,
                width=SIZE, latents=nchw(latents), output_type="np").images)
            record(ref, case, latents, noise, images)
            print(case, "image std", float(images.std()))
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **ref)
    meta = {"cases": CASES, "size": SIZE, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(NAME, {k: v.shape for k, v in ref.items()})


# ----------------------------------------------------------------------------- LCM-LoRA on tiny-sd1
def lora_factor(key, shape, gain=0.5):
    rng = np.random.default_rng([9, zlib.crc32(key.encode())])
    return (gain * rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))).astype(np.float32)


def lcm_lora_tensors(unet):
    tensors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(LORA_TARGETS):
            continue
        if isinstance(module, torch.nn.Conv2d):
            out_c, in_c, kh, kw = module.weight.shape
            down, up = (LORA_RANK, in_c, kh, kw), (out_c, LORA_RANK, 1, 1)
        else:
            out_c, in_c = module.weight.shape
            down, up = (LORA_RANK, in_c), (out_c, LORA_RANK)
        base = f"unet.{name}"
        # float16, as the published LCM-LoRA files (and half the size)
        tensors[f"{base}.lora_A.weight"] = lora_factor(f"{base}.A", down).astype(np.float16)
        tensors[f"{base}.lora_B.weight"] = lora_factor(f"{base}.B", up).astype(np.float16)
    return tensors


def make_lora():
    from safetensors.torch import save_file

    tiny = tiny_reference()
    path = os.path.join(LORA_OUT, LORA_FILE)
    ref = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pipe = build_pipeline(tmp)
        tensors = lcm_lora_tensors(pipe.unet)
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
        print(f"{LORA_FILE}: {len(tensors) // 2} modules, {os.path.getsize(path) / 1e3:.0f} kB")
        pipe.load_lora_weights(path)
        ref["unet_out"] = nhwc(pipe.unet(nchw(tiny["unet_latents"]), torch.from_numpy(tiny["unet_timesteps"]).long(),
                                         torch.from_numpy(tiny["unet_context"])).sample)
        print("LoRA: max UNet change", float(np.abs(ref["unet_out"] - tiny["unet_out"]).max()))
        rng = np.random.default_rng(8765)
        lat = tiny["gen_latents"].shape[1]
        config = pipe.scheduler.config
        for case, c in LORA_CASES.items():
            pipe.scheduler = getattr(diffusers, c["scheduler"]).from_config(config)
            latents = rng.standard_normal((1, lat, lat, 4)).astype("float32")
            noise = our_step_noise(c["seed"], c["steps"], (1, lat, lat, 4))
            kwargs = {"eta": c["eta"]} if "eta" in c else {}
            images = with_noise(noise, lambda: pipe(
                tiny["meta"]["gen_prompt"], negative_prompt=c["negative"], num_inference_steps=c["steps"],
                guidance_scale=c["guidance"], height=SIZE, width=SIZE, latents=nchw(latents), output_type="np",
                **kwargs).images)
            record(ref, case, latents, noise, images)
            print(case, "image std", float(images.std()))
    np.savez_compressed(os.path.join(LORA_OUT, "lcm_reference.npz"), **ref)
    meta = {"file": LORA_FILE, "rank": LORA_RANK, "targets": list(LORA_TARGETS), "prompt": tiny["meta"]["gen_prompt"],
            "cases": LORA_CASES, "size": SIZE, "torch": torch.__version__, "diffusers": diffusers.__version__}
    with open(os.path.join(LORA_OUT, "lcm_reference.json"), "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    make_distilled()
    make_lora()
