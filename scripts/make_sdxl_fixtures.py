"""Reference outputs of diffusers' SDXL pipelines on the tiny SDXL-like models (needs torch, diffusers, transformers).

    python scripts/make_sdxl_fixtures.py

For each spec in tiny_specs.SDXL_SPECS it builds the diffusers / transformers models with the
deterministic random weights of tests/support/random_weights.py, writes the configs under
tests/fixtures/<name>/ (a diffusers SDXL folder without weights or vocabulary: unet/, vae/,
text_encoder/ (not for the refiner), text_encoder_2/, scheduler/, tokenizer*/ with the pad token,
model_index.json with the pipeline flags) and records in tests/fixtures/<name>/reference.npz:

    ids_1, ids_2          token ids of PROMPTS + [NEGATIVE] by tokenizer / tokenizer_2 (ids_1: base only)
    embeds, pooled        encode_prompt(PROMPTS): prompt_embeds, pooled_prompt_embeds
    neg_embeds, neg_pooled       ... negative_prompt_embeds / negative_pooled_prompt_embeds for NEGATIVE
    none_neg_embeds, none_neg_pooled   ... with no negative prompt (zeros where force_zeros_for_empty_prompt)
    skip1_embeds          encode_prompt(PROMPTS, clip_skip=1)
    unet_latents, unet_timesteps, unet_time_ids, unet_out     UNet with added conditions (NHWC;
                          context = embeds, text_embeds = pooled)
    vae_latents, vae_decoded, vae_images, vae_encoded         (NHWC; encoded = posterior mean)
  base (tiny-sdxl), 10 Euler steps, guidance 5, given latents (`<case>_latents`, NHWC):
    gen_neg               64x64, negative prompt
    gen_none              64x96 (H x W), no negative prompt (zeros)
    gen_cond              64x64, micro-conditioning (MICRO) and guidance_rescale 0.7
    handoff_latents       the base's latents at denoising_end 0.8 (output_type="latent")
  refiner (tiny-sdxl-refiner), with the base's handoff_latents loaded from tiny-sdxl:
    handoff               denoising_start 0.8 from them (the "ensemble of experts")
    img2img_0.3           StableDiffusionXLImg2ImgPipeline on IMAGE, strength 0.3, aesthetic scores default
  editing on the base (`<case>_noise` is the patched randn_tensor's noise, NHWC):
    img2img_0.6           StableDiffusionXLImg2ImgPipeline, strength 0.6
    inpaint_0.75          StableDiffusionXLInpaintPipeline (4-channel UNet, latent blending), strength 0.75
  tiny-sdxl-inpaint (9-channel UNet):
    inpaint_1.0           strength 1.0 with given latents (`inpaint_1.0_latents`)
    inpaint_0.75          strength 0.75, given noise

Every image case is stored as `<case>_float` (float32 in [0, 1]) and `<case>_image` (uint8). As in
scripts/make_editing_fixtures.py, `retrieve_latents` is patched to the VAE posterior mean and
`randn_tensor` to the stored noise.
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_mod  # noqa: E402
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as inpaint_mod  # noqa: E402
from PIL import Image  # noqa: E402

import make_editing_fixtures as mef  # noqa: E402
import make_parity_fixtures as mpf  # noqa: E402
from tiny_specs import SDXL_SPECS  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse!", "Hello, world!!! café ünïcode 😀, (emphasis:1.2)"]
NEGATIVE = "blurry, low quality!"
STEPS = 10
GUIDANCE = 5.0
SIZE = 64
HANDOFF = 0.8
MICRO = dict(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(64, 64),
             negative_original_size=(32, 32), negative_target_size=(64, 64), guidance_rescale=0.7)
TIME_IDS = {6: [[64, 64, 0, 0, 64, 64], [128, 96, 16, 8, 64, 96]], 5: [[64, 64, 0, 0, 6.0], [128, 96, 16, 8, 2.5]]}


def build(spec):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**spec["unet"]).eval()
    vae = diffusers.AutoencoderKL(**spec["vae"]).eval()
    mpf.load_random(unet)
    mpf.load_random(vae)
    text_encoder = None
    if spec["text_encoder"] is not None:
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text_encoder"])).eval()
        mpf.load_random(text_encoder, mpf.clip_keys(text_encoder))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**spec["text_encoder_2"])).eval()
    mpf.load_random(text_encoder_2)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(spec["scheduler"])  # as SDXL: ignores clip_sample etc.
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, scheduler=scheduler)


def tokenizers(tmp, spec):
    out = {"tokenizer": None}
    for sub, key in (("tokenizer", "pad_token"), ("tokenizer_2", "pad_token_2")):
        if key in spec:
            mpf.tokenizer_folder(os.path.join(tmp, sub), spec[key])
            out[sub] = transformers.CLIPTokenizer.from_pretrained(os.path.join(tmp, sub))
    return out


def write_configs(out_dir, spec, parts, pipe):
    for sub in ("unet", "vae", "scheduler"):
        parts[sub].save_config(os.path.join(out_dir, sub))
    for sub in ("text_encoder", "text_encoder_2"):
        if parts[sub] is not None:
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
            parts[sub].config.to_json_file(os.path.join(out_dir, sub, "config.json"))
    for sub, key in (("tokenizer", "pad_token"), ("tokenizer_2", "pad_token_2")):
        if key in spec:
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
            with open(os.path.join(out_dir, sub, "special_tokens_map.json"), "w") as f:
                json.dump({"pad_token": spec[key]}, f)
    pipe.save_config(out_dir)  # model_index.json: component classes and the pipeline flags


def images(out, ref, case):
    ref[f"{case}_float"] = out.astype("float32")
    ref[f"{case}_image"] = (out * 255).round().astype("uint8")


def make(name, spec, handoff_latents=None):
    out_dir = os.path.join(ROOT, "tests", "fixtures", name)
    parts = build(spec)
    flags = spec["pipeline"]
    given = mef._GivenNoise()
    for mod in (img2img_mod, inpaint_mod):
        mod.randn_tensor = given
        mod.retrieve_latents = mef._posterior_mean
    rng = np.random.default_rng(2024)
    ref, cases = {}, []
    lat = SIZE // 8
    image, mask = mef.test_image(), mef.test_mask()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        toks = tokenizers(tmp, spec)
        common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                      tokenizer=toks["tokenizer"], tokenizer_2=toks["tokenizer_2"], unet=parts["unet"],
                      scheduler=parts["scheduler"], force_zeros_for_empty_prompt=flags["force_zeros_for_empty_prompt"],
                      add_watermarker=False)
        aesthetics = dict(requires_aesthetics_score=flags.get("requires_aesthetics_score", False))
        refiner = flags.get("requires_aesthetics_score", False)
        if refiner:
            t2i = None
        else:
            t2i = diffusers.StableDiffusionXLPipeline(**common)
        i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**common, **aesthetics)
        inp = diffusers.StableDiffusionXLInpaintPipeline(**common, **aesthetics)
        for p in (t2i, i2i, inp):
            if p is not None:
                p.set_progress_bar_config(disable=True)
        write_configs(out_dir, spec, parts, t2i or i2i)

        # Token ids and text conditioning.
        texts = PROMPTS + [NEGATIVE]
        for sub, key in (("tokenizer", "ids_1"), ("tokenizer_2", "ids_2")):
            if toks[sub] is not None:
                ref[key] = toks[sub](texts, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="np").input_ids.astype("int32")
        enc = (t2i or i2i).encode_prompt
        e, ne, p, npool = enc(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                              negative_prompt=[NEGATIVE] * len(PROMPTS))
        ref.update(embeds=e.numpy(), neg_embeds=ne.numpy(), pooled=p.numpy(), neg_pooled=npool.numpy())
        _, ne0, _, np0 = enc(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        ref.update(none_neg_embeds=ne0.numpy(), none_neg_pooled=np0.numpy())
        ref["skip1_embeds"] = enc(PROMPTS, device="cpu", do_classifier_free_guidance=False, clip_skip=1)[0].numpy()

        # UNet with added conditions; VAE.
        unet, vae = parts["unet"], parts["vae"]
        n_ids = 5 if refiner else 6
        ref["unet_latents"] = rng.standard_normal((2, lat, lat, unet.config.in_channels)).astype("float32")
        ref["unet_timesteps"] = np.array([981, 37], dtype="int32")
        ref["unet_time_ids"] = np.array(TIME_IDS[n_ids], dtype="float32")
        ref["unet_out"] = mpf.nhwc(unet(
            mpf.nchw(ref["unet_latents"]), torch.from_numpy(ref["unet_timesteps"]).long(), e,
            added_cond_kwargs={"text_embeds": p, "time_ids": torch.from_numpy(ref["unet_time_ids"])}).sample)
        ref["vae_latents"] = rng.standard_normal((1, lat, lat, 4)).astype("float32")
        ref["vae_decoded"] = mpf.nhwc(vae.decode(mpf.nchw(ref["vae_latents"])).sample)
        ref["vae_images"] = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype("float32")
        ref["vae_encoded"] = mpf.nhwc(vae.encode(mpf.nchw(ref["vae_images"])).latent_dist.mean)

        gen = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")
        pil = Image.fromarray(image)
        if not refiner and unet.config.in_channels == 4:
            for case, h, w, kwargs in (
                ("gen_neg", SIZE, SIZE, dict(negative_prompt=NEGATIVE)),
                ("gen_none", SIZE, SIZE + 32, {}),
                ("gen_cond", SIZE, SIZE, dict(negative_prompt=NEGATIVE, **MICRO)),
            ):
                latents = rng.standard_normal((1, h // 8, w // 8, 4)).astype("float32")
                ref[f"{case}_latents"] = latents
                images(t2i(PROMPTS[0], height=h, width=w, latents=mpf.nchw(latents), **kwargs, **gen).images, ref, case)
                cases.append({"name": case, "kind": "text2image", "height": h, "width": w,
                              **{k: v for k, v in kwargs.items()}})
            latents = rng.standard_normal((1, lat, lat, 4)).astype("float32")
            ref["handoff_start_latents"] = latents
            out = t2i(PROMPTS[0], negative_prompt=NEGATIVE, height=SIZE, width=SIZE, latents=mpf.nchw(latents),
                      denoising_end=HANDOFF, **{**gen, "output_type": "latent"}).images
            ref["handoff_latents"] = mpf.nhwc(out)
            cases.append({"name": "handoff_latents", "kind": "text2image", "denoising_end": HANDOFF})
            editing = [("img2img_0.6", "img2img", 0.6), ("inpaint_0.75", "inpaint", 0.75)]
        elif refiner:
            out = i2i(PROMPTS[0], negative_prompt=NEGATIVE, image=torch.from_numpy(
                handoff_latents.transpose(0, 3, 1, 2).copy()), denoising_start=HANDOFF, **gen).images
            images(out, ref, "handoff")
            ref["handoff_latents"] = handoff_latents
            cases.append({"name": "handoff", "kind": "img2img", "denoising_start": HANDOFF})
            editing = [("img2img_0.3", "img2img", 0.3)]
        else:
            editing = [("inpaint_1.0", "inpaint", 1.0), ("inpaint_0.75", "inpaint", 0.75)]

        for case, kind, strength in editing:
            noise = rng.standard_normal((1, lat, lat, 4)).astype("float32")
            kwargs = dict(prompt=PROMPTS[0], negative_prompt=NEGATIVE, image=pil, strength=strength, **gen)
            given.calls = 0
            if kind == "inpaint":
                kwargs.update(mask_image=Image.fromarray(mask, "L"), height=SIZE, width=SIZE)
            if strength == 1.0:  # diffusers uses given latents as the noise only at full strength
                kwargs["latents"] = mpf.nchw(noise)
                ref[f"{case}_latents"] = noise
                given.noise = None
            else:
                given.noise = mpf.nchw(noise)
                ref[f"{case}_noise"] = noise
            out = (inp if kind == "inpaint" else i2i)(**kwargs).images
            assert given.calls == (0 if strength == 1.0 else 1), given.calls
            images(out, ref, case)
            cases.append({"name": case, "kind": kind, "strength": strength})
        if kind == "inpaint" or any(c["kind"] == "inpaint" for c in cases):
            ref["mask"] = mask
        ref["image"] = image

    meta = {"prompts": PROMPTS, "negative": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE, "size": SIZE,
            "handoff": HANDOFF, "micro": {k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()},
            "cases": cases, "vae_latents": "posterior mean (retrieve_latents patched)",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **ref)
    print(name, {k: v.shape for k, v in ref.items()})
    return ref


if __name__ == "__main__":
    base = make("tiny-sdxl", SDXL_SPECS["tiny-sdxl"])
    make("tiny-sdxl-refiner", SDXL_SPECS["tiny-sdxl-refiner"], handoff_latents=base["handoff_latents"])
    make("tiny-sdxl-inpaint", SDXL_SPECS["tiny-sdxl-inpaint"])
