"""Full-size parity: the real SD architecture with random weights, diffusers vs diffusion_tf.

    pip install torch==2.13.0 diffusers transformers
    python benchmarks/full_size_parity.py [--preset sd-v1-5] [--size 512] [--work DIR]

1. builds the preset's UNet, VAE and CLIP text encoder in diffusers/transformers
   with random weights (torch.manual_seed(0));
2. writes them as ONE original-layout single-file .safetensors (LDM keys), and checks
   with diffusers' own single-file converters that the file reads back to the same
   weights;
3. converts that file with `python -m weights_port FILE DST --config PRESET`;
4. compares every component on fixed inputs: text encoder (real prompts), UNet
   (batch 2 at size/8 latents), VAE decode and encode (size x size), and prints the
   max absolute and relative errors; results go to benchmarks/results/.

Needs about 16 GB of memory and 9 GB of disk for SD 1.5 in float32.
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def errors(ours, ref):
    ours, ref = np.asarray(ours, "float64"), np.asarray(ref, "float64")
    abs_err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    return {"max_abs_error": abs_err, "output_scale": scale, "relative_error": abs_err / max(scale, 1.0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd-v1-5")
    p.add_argument("--size", type=int, default=512, help="image size for the UNet/VAE comparisons")
    p.add_argument("--work", default=None, help="folder for the checkpoint and converted model (default: temp)")
    args = p.parse_args()

    import torch
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils

    from diffusion_tf import presets
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import get_state_dict
    from weights_port.convert import original_tables
    from weights_port.key_table import invert

    torch.set_num_threads(os.cpu_count())
    configs = presets.get_preset(args.preset)["configs"]
    work = args.work or tempfile.mkdtemp(prefix="full_size_parity_")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, f"{args.preset}-random.safetensors")
    dst = os.path.join(work, f"{args.preset}-random-converted")
    results = {"preset": args.preset, "size": args.size, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    timings = {}

    # 1. reference models with random weights
    t0 = time.time()
    torch.manual_seed(0)
    ref = {
        "unet": diffusers.UNet2DConditionModel(**configs["unet"]).eval(),
        "vae": diffusers.AutoencoderKL(**configs["vae"]).eval(),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).eval(),
    }
    with torch.no_grad():  # GroupNorm/LayerNorm affine params are 1/0 at init: randomise them too
        for model in ref.values():
            for name, param in model.named_parameters():
                if param.ndim == 1 and "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
    timings["build_reference_s"] = time.time() - t0

    # 2. one original-layout single file, written with our tables, read back by diffusers
    t0 = time.time()
    shells = {c: build_model(c, configs[c]) for c in ("text_encoder", "unet", "vae")}
    tables = original_tables(shells, configs)
    state = {}
    for component, model in ref.items():
        sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        if component == "text_encoder" and not next(iter(sd)).startswith("text_model."):
            sd = {"text_model." + k: v for k, v in sd.items()}
        state.update(invert(tables[component], sd))
    del shells
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, ckpt)
    timings["write_checkpoint_s"] = time.time() - t0
    checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    back = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(ref["unet"].config))
    results["diffusers_reads_our_file"] = all(
        torch.equal(back[k], v) for k, v in ref["unet"].state_dict().items()
    ) and len(back) == len(ref["unet"].state_dict())
    del checkpoint, back, state
    gc.collect()

    # 3. convert with weights_port
    t0 = time.time()
    from weights_port.__main__ import main as port

    if not os.path.exists(dst):
        assert port([ckpt, dst, "--config", args.preset]) == 0
    timings["convert_s"] = time.time() - t0

    # 4. compare components
    from diffusion_tf import Text2Image

    t0 = time.time()
    pipe = Text2Image(model=dst, img_height=args.size, img_width=args.size)
    timings["load_s"] = time.time() - t0
    rng = np.random.default_rng(0)
    prompts = ["a photograph of an astronaut riding a horse", "a watercolor painting of a fox in the snow"]
    ids = pipe.tokenize(prompts)
    with torch.no_grad():
        ref_text = ref["text_encoder"](torch.from_numpy(ids.astype("int64"))).last_hidden_state.numpy()
    results["text_encoder"] = errors(pipe.text_encoder(ids), ref_text)

    lat = args.size // 8
    latents = rng.standard_normal((2, lat, lat, 4)).astype("float32")
    timesteps = np.array([801, 801], "int32")
    with torch.no_grad():
        t0 = time.time()
        ref_unet = nhwc(ref["unet"](nchw(latents), torch.from_numpy(timesteps).long(),
                                    torch.from_numpy(ref_text)).sample)
        timings["unet_diffusers_eager_s"] = time.time() - t0
    del ref["unet"]
    gc.collect()
    t0 = time.time()
    ours_unet = pipe.predict_noise(latents, timesteps, ref_text)
    timings["unet_ours_eager_s"] = time.time() - t0
    results["unet"] = errors(ours_unet, ref_unet)

    vae_latents = rng.standard_normal((1, lat, lat, 4)).astype("float32")
    images = rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype("float32")
    with torch.no_grad():
        t0 = time.time()
        ref_dec = nhwc(ref["vae"].decode(nchw(vae_latents)).sample)
        timings["vae_decode_diffusers_eager_s"] = time.time() - t0
        ref_enc = nhwc(ref["vae"].encode(nchw(images)).latent_dist.mean)
    t0 = time.time()
    results["vae_decode"] = errors(pipe.vae.decode(vae_latents), ref_dec)
    timings["vae_decode_ours_eager_s"] = time.time() - t0
    results["vae_encode"] = errors(pipe.vae.encode(images), ref_enc)
    results["timings"] = timings

    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"full_size_parity_{args.preset}_{args.size}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
