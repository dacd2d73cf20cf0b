"""Full-size SDXL parity: the real SDXL base architecture (2.6 B UNet parameters) with random
weights, diffusers vs diffusion_tf, converted from a diffusers folder and from an SGM single file.

    pip install torch==2.13.0 diffusers transformers
    python benchmarks/sdxl_full_size_parity.py [--size 512] [--work DIR]

Both frameworks do not fit 24 GiB together (14 GB of float32 weights each), so every stage is a
process of its own, run one after the other:
1. reference (torch): the sdxl-base-1.0 preset's diffusers/transformers networks with random
   weights (torch.manual_seed(0), norms randomised too), written as a diffusers folder
   (save_pretrained) and as an SGM single file (conditioner.embedders.0.transformer.*,
   conditioner.embedders.1.model.* with fused in_proj and transposed text_projection,
   model.diffusion_model.* with label_emb, first_stage_model.*; names from weights_port's key
   functions, which tests/convert checks against diffusers' own single-file converters); then
   the reference outputs: token ids of both tokenizers, encode_prompt's prompt_embeds and
   pooled_prompt_embeds (with a negative prompt), the UNet with added conditions (batch 2 at
   size/8 latents), VAE decode and encode (size x size);
2. for each source: `convert_checkpoint` (the SGM file WITHOUT --config: the architecture is
   inferred from its keys), then, in a fresh process, Text2Image on the converted folder and
   every output compared (max abs error relative to the output's scale where larger than 1).
Results: benchmarks/results/sdxl_full_size_parity_<size>.json. Needs ~16 GB of memory and
~45 GB of disk (the folder, the single file and one converted folder at a time).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
PROMPTS = ["a photograph of an astronaut riding a horse!", "a watercolor painting of a fox in the snow, café"]
NEGATIVE = "blurry, low quality"
PRESET = "sdxl-base-1.0"


def errors(ours, ref):
    ours, ref = np.asarray(ours, "float64"), np.asarray(ref, "float64")
    abs_err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    return {"max_abs_error": abs_err, "output_scale": scale, "relative_error": abs_err / max(scale, 1.0)}


# ---------------------------------------------------------------- 1. the reference (torch only)
def _sgm_state(models, configs):
    """The diffusers/transformers state dicts under the SGM single file's names and layouts."""
    import torch

    from weights_port import clip_keys, unet_keys, vae_keys

    out = {}
    for key, value in models["unet"].state_dict().items():
        out[unet_keys.original_key(key, configs["unet"])] = value
    for key, value in models["vae"].state_dict().items():
        target = vae_keys.original_key(key, configs["vae"])
        if ".mid.attn_1." in target and target.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # stored as 1x1 convolutions
        out[target] = value
    te1 = models["text_encoder"].state_dict()
    for key, value in te1.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        out[clip_keys.SGM_HF_PREFIX + "text_model." + bare] = value
    te2 = models["text_encoder_2"].state_dict()
    te2 = {k: v for k, v in te2.items() if not k.endswith("position_ids")}
    fused = {}
    for key, source in clip_keys.openclip_table(list(te2), clip_keys.SGM_OPENCLIP_PREFIX).items():
        value = te2[key].t() if source.transpose else te2[key]
        if source.split is None:
            out[source.keys[0]] = value
        else:
            fused.setdefault(source.keys[0], {})[source.split[0]] = value
    for target, parts in fused.items():
        out[target] = torch.cat([parts[i] for i in sorted(parts)], 0)
    out[clip_keys.SGM_OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    return {k: v.contiguous() for k, v in out.items()}


def reference(work, size):
    import torch
    import diffusers
    import transformers
    from safetensors.torch import save_file

    import make_parity_fixtures as mpf
    from diffusion_tf.presets.registry import get_preset

    torch.set_num_threads(os.cpu_count())
    configs = get_preset(PRESET)["configs"]
    timings = {}
    t0 = time.time()
    torch.manual_seed(0)
    models = {
        "unet": diffusers.UNet2DConditionModel(**configs["unet"]).eval(),
        "vae": diffusers.AutoencoderKL(**configs["vae"]).eval(),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])).eval(),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**configs["text_encoder_2"])).eval(),
    }
    with torch.no_grad():  # GroupNorm/LayerNorm affine params are 1/0 at init: randomise them too
        for model in models.values():
            for name, param in model.named_parameters():
                if param.ndim == 1 and "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
    timings["build_s"] = time.time() - t0
    params = {c: sum(p.numel() for p in m.parameters()) for c, m in models.items()}

    t0 = time.time()
    folder = os.path.join(work, "diffusers")
    for c, m in models.items():
        m.save_pretrained(os.path.join(folder, c))
    scheduler = diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"])
    scheduler.save_config(os.path.join(folder, "scheduler"))
    toks = {}
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        mpf.tokenizer_folder(os.path.join(folder, sub), pad)
        toks[sub] = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, sub))
    pipe = diffusers.StableDiffusionXLPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                               text_encoder_2=models["text_encoder_2"], tokenizer=toks["tokenizer"],
                                               tokenizer_2=toks["tokenizer_2"], unet=models["unet"],
                                               scheduler=scheduler, add_watermarker=False)
    pipe.save_config(folder)
    timings["write_folder_s"] = time.time() - t0
    t0 = time.time()
    single = os.path.join(work, "sdxl-random.safetensors")
    save_file(_sgm_state(models, configs), single)
    timings["write_single_file_s"] = time.time() - t0

    ref = {}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        texts = PROMPTS + [NEGATIVE]
        for sub, key in (("tokenizer", "ids_1"), ("tokenizer_2", "ids_2")):
            ref[key] = toks[sub](texts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="np").input_ids.astype("int32")
        e, ne, p, npool = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                             negative_prompt=[NEGATIVE] * 2)
        ref.update(embeds=e.numpy(), neg_embeds=ne.numpy(), pooled=p.numpy(), neg_pooled=npool.numpy())
        lat = size // 8
        ref["unet_latents"] = rng.standard_normal((2, lat, lat, 4)).astype("float32")
        ref["unet_timesteps"] = np.array([801, 801], "int32")
        ref["time_ids"] = np.array([[size, size, 0, 0, size, size]] * 2, "float32")
        t0 = time.time()
        ref["unet_out"] = mpf.nhwc(models["unet"](
            mpf.nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(), e,
            added_cond_kwargs={"text_embeds": p, "time_ids": torch.from_numpy(ref["time_ids"])}).sample)
        timings["unet_eager_s"] = time.time() - t0
        del models["unet"], pipe
        ref["vae_latents"] = rng.standard_normal((1, lat, lat, 4)).astype("float32")
        ref["vae_decoded"] = mpf.nhwc(models["vae"].decode(mpf.nchw(ref["vae_latents"])).sample)
        ref["vae_images"] = rng.uniform(-1, 1, (1, size, size, 3)).astype("float32")
        ref["vae_encoded"] = mpf.nhwc(models["vae"].encode(mpf.nchw(ref["vae_images"])).latent_dist.mean)
    np.savez(os.path.join(work, "reference.npz"), **ref)
    meta = {"params": params, "timings": timings, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    with open(os.path.join(work, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta, indent=2), flush=True)


# ---------------------------------------------------------------- 2. ours (TensorFlow only)
def convert(work, source):
    from weights_port.convert import convert_checkpoint

    src = os.path.join(work, "diffusers") if source == "folder" else os.path.join(work, "sdxl-random.safetensors")
    t0 = time.time()
    convert_checkpoint(src, os.path.join(work, f"converted-{source}"), log=lambda m: print(m, flush=True))
    with open(os.path.join(work, f"convert-{source}.json"), "w") as f:
        json.dump({"convert_s": time.time() - t0}, f)


def compare(work, source, size):
    from benchmarks.peak_memory import peak_rss_gib
    from diffusion_tf import Text2Image

    folder = os.path.join(work, f"converted-{source}")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    ref = dict(np.load(os.path.join(work, "reference.npz")))
    t0 = time.time()
    pipe = Text2Image(model=folder, img_height=size, img_width=size, prompt_syntax="plain")
    out = {"load_s": time.time() - t0, "is_xl": pipe.is_xl, "num_time_ids": pipe.num_time_ids,
           "inferred_unet": {k: config["unet"].get(k) for k in (
               "block_out_channels", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
               "projection_class_embeddings_input_dim", "addition_time_embed_dim")}}
    texts = PROMPTS + [NEGATIVE]
    out["ids_equal"] = bool(np.array_equal(pipe.tokenizer(texts), ref["ids_1"])
                            and np.array_equal(pipe.tokenizer_2(texts), ref["ids_2"]))
    context, pooled = pipe.encode_text(PROMPTS)
    out["prompt_embeds"], out["pooled_prompt_embeds"] = errors(context, ref["embeds"]), errors(pooled, ref["pooled"])
    context, pooled = pipe.encode_text([NEGATIVE] * 2)
    out["negative_prompt_embeds"] = errors(context, ref["neg_embeds"])
    out["negative_pooled_prompt_embeds"] = errors(pooled, ref["neg_pooled"])
    t0 = time.time()
    unet = pipe.predict_noise(ref["unet_latents"], ref["unet_timesteps"], ref["embeds"],
                              added_cond={"text_embeds": ref["pooled"], "time_ids": ref["time_ids"]})
    out["unet_eager_s"] = time.time() - t0
    out["unet"] = errors(unet, ref["unet_out"])
    out["vae_decode"] = errors(pipe.vae.decode(ref["vae_latents"]), ref["vae_decoded"])
    out["vae_encode"] = errors(pipe.vae.encode(ref["vae_images"]), ref["vae_encoded"])
    out["peak_rss_gib"] = peak_rss_gib()
    with open(os.path.join(work, f"compare-{source}.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2), flush=True)


def _stage(*args):
    t0 = time.time()
    subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True)
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--work", default=None)
    p.add_argument("--stage", choices=["reference", "convert", "compare"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--source", choices=["folder", "sgm"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "reference":
        return reference(args.work, args.size)
    if args.stage == "convert":
        return convert(args.work, args.source)
    if args.stage == "compare":
        return compare(args.work, args.source, args.size)

    work = args.work or tempfile.mkdtemp(prefix="sdxl_full_size_")
    os.makedirs(work, exist_ok=True)
    common = ["--work", work, "--size", str(args.size)]
    results = {"preset": PRESET, "size": args.size, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if not os.path.isfile(os.path.join(work, "reference.npz")):
        _stage("--stage", "reference", *common)
    with open(os.path.join(work, "reference.json")) as f:
        results["reference"] = json.load(f)
    for source in ("folder", "sgm"):
        _stage("--stage", "convert", "--source", source, *common)
        _stage("--stage", "compare", "--source", source, *common)
        with open(os.path.join(work, f"compare-{source}.json")) as f:
            results[source] = json.load(f)
        with open(os.path.join(work, f"convert-{source}.json")) as f:
            results[source].update(json.load(f))
        shutil.rmtree(os.path.join(work, f"converted-{source}"))
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"sdxl_full_size_parity_{args.size}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
