"""Reference outputs of diffusers' image-to-image and inpainting pipelines on the tiny models.

    python scripts/make_editing_fixtures.py     (needs torch, diffusers, transformers)

Writes tests/fixtures/<name>/editing.npz and editing.json for tiny-sd1 (4-channel UNet:
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline with latent blending)
and tiny-sd1-inpaint (9-channel UNet, spec in tiny_specs.EDITING_SPECS; its config folders
are written here the same way scripts/make_parity_fixtures.py writes the others).

Every case: a fixed 64x64 image (and mask), 10 DDIM steps, guidance 7.5, a negative
prompt, and given noise. Two patches make diffusers deterministic and comparable:
  * `randn_tensor` of the pipeline module returns the stored noise (NCHW of `<case>_noise`);
  * `retrieve_latents` returns the VAE posterior MEAN (diffusers samples the posterior;
    diffusion_tf always uses the mean), as `sample_mode="argmax"` does.
The stored outputs are the raw decoded images (no paste-back / overlay), uint8 and float.
"""

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod  # noqa: E402
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_mod  # noqa: E402
from PIL import Image  # noqa: E402

import make_parity_fixtures as mpf  # noqa: E402
from tiny_specs import EDITING_SPECS, TINY_SPECS  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
STEPS = 10
GUIDANCE = 7.5
SIZE = 64
# name -> [(case, pipeline kind, strength)]
CASES = {
    "tiny-sd1": [("img2img_0.6", "img2img", 0.6), ("img2img_1.0", "img2img", 1.0),
                 ("inpaint_1.0", "inpaint", 1.0), ("inpaint_0.75", "inpaint", 0.75)],
    "tiny-sd1-inpaint": [("inpaint_1.0", "inpaint", 1.0), ("inpaint_0.75", "inpaint", 0.75)],
}


def test_image():
    """A smooth 64x64 RGB picture: colour gradients and a disc."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype("float32") / (SIZE - 1)
    disc = ((x - 0.4) ** 2 + (y - 0.55) ** 2 < 0.08).astype("float32")
    r = 255 * (0.2 + 0.6 * x) * (1 - 0.5 * disc)
    g = 255 * (0.3 + 0.5 * y * (1 - x)) + 60 * disc
    b = 255 * (0.8 - 0.5 * y) * (1 - disc) + 30 * disc
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype("uint8")


def test_mask():
    """White (repaint) rectangle not aligned to the 8-pixel latent grid; 0/255 uint8."""
    mask = np.zeros((SIZE, SIZE), "uint8")
    mask[13:45, 21:52] = 255
    return mask


def build(name, spec):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**spec["unet"]).eval()
    vae = diffusers.AutoencoderKL(**spec["vae"]).eval()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**spec["text_encoder"])).eval()
    scheduler = diffusers.DDIMScheduler(**spec["scheduler"])
    mpf.load_random(unet)
    mpf.load_random(vae)
    mpf.load_random(text_encoder, mpf.clip_keys(text_encoder))
    return unet, vae, text_encoder, scheduler


def write_configs(out_dir, spec, unet, vae, text_encoder, scheduler):
    for sub, obj in (("unet", unet), ("vae", vae)):
        obj.save_config(os.path.join(out_dir, sub))
    scheduler.save_config(os.path.join(out_dir, "scheduler"))
    os.makedirs(os.path.join(out_dir, "text_encoder"), exist_ok=True)
    text_encoder.config.to_json_file(os.path.join(out_dir, "text_encoder", "config.json"))
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer", "special_tokens_map.json"), "w") as f:
        json.dump({"pad_token": spec["pad_token"]}, f)


class _GivenNoise:
    """Replaces `randn_tensor` in the pipeline modules by the stored noise."""

    def __init__(self):
        self.noise = None
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.noise.shape), (shape, self.noise.shape)
        self.calls += 1
        return self.noise.clone().to(dtype=dtype or torch.float32)


def _posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()  # the mean of the diagonal Gaussian


def make(name, spec):
    import tempfile

    out_dir = os.path.join(ROOT, "tests", "fixtures", name)
    unet, vae, text_encoder, scheduler = build(name, spec)
    if name not in TINY_SPECS:
        write_configs(out_dir, spec, unet, vae, text_encoder, scheduler)
    given = _GivenNoise()
    for mod in (img2img_mod, inpaint_mod):
        mod.randn_tensor = given
        mod.retrieve_latents = _posterior_mean

    image, mask = test_image(), test_mask()
    ref = {"image": image, "mask": mask}
    rng = np.random.default_rng(4321)
    lat = SIZE // 8
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        mpf.tokenizer_folder(tmp, spec["pad_token"])
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
        parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipes = {"img2img": diffusers.StableDiffusionImg2ImgPipeline(**parts),
                 "inpaint": diffusers.StableDiffusionInpaintPipeline(**parts)}
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        for case, kind, strength in CASES[name]:
            noise = rng.standard_normal((1, lat, lat, 4)).astype("float32")
            given.noise, given.calls = mpf.nchw(noise), 0
            kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(image),
                          strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                          output_type="np")
            if kind == "inpaint":
                kwargs.update(mask_image=Image.fromarray(mask, "L"), height=SIZE, width=SIZE)
            out = pipes[kind](**kwargs).images
            assert given.calls == 1, given.calls
            ref[f"{case}_noise"] = noise
            ref[f"{case}_float"] = out.astype("float32")
            ref[f"{case}_image"] = (out * 255).round().astype("uint8")

    meta = {"prompt": PROMPT, "negative": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE, "size": SIZE,
            "cases": [{"name": c, "kind": k, "strength": s} for c, k, s in CASES[name]],
            "vae_latents": "posterior mean (retrieve_latents patched)",
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    with open(os.path.join(out_dir, "editing.json"), "w") as f:
        json.dump(meta, f, indent=2)
    np.savez_compressed(os.path.join(out_dir, "editing.npz"), **ref)
    print(name, {k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    specs = {**TINY_SPECS, **EDITING_SPECS}
    for name in CASES:
        make(name, specs[name])
