"""Reference outputs for swapping the VAE: TAESD (diffusers' AutoencoderTiny) and an AutoencoderKL
read from an original-layout file (needs torch, diffusers, transformers).

    python scripts/make_vae_fixtures.py              writes tests/fixtures/vae/
    python scripts/make_vae_fixtures.py --out X.npz  the same arrays into X.npz only (the live tests)

Every weight is a `tests/support/random_weights` value drawn from its diffusers key and shape, so
the tests rebuild the same files without PyTorch (tests/support/vae_files.py). Writes:

    <name>/config.json   the diffusers config of each tiny AutoencoderTiny of SPECS
    taesd-full.json      the full-size TAESD: diffusers' default AutoencoderTiny config (the one
                         madebyollin/taesd and madebyollin/taesdxl publish) and its {key: shape}
    reference.npz        (NHWC)
      <name>_latents, <name>_decoded      AutoencoderTiny.decode
      <name>_images, <name>_encoded       AutoencoderTiny.encode(...).latents
      full_latents, full_decoded, full_images, full_encoded    the same, full-size TAESD
      taesd_gen_image, taesd_gen_float    tiny-sd1's StableDiffusionPipeline with
                         `pipe.vae = AutoencoderTiny(tiny-taesd)`: 10 DDIM steps, guidance 7.5, the
                         negative prompt, tiny-sd1's reference gen_latents (as in diffusers' docs:
                         the pipeline divides by vae.config.scaling_factor, 1.0, before decoding)
      taesd_img2img_noise, taesd_img2img_image, taesd_img2img_float    its img2img pipeline at
                         strength 0.6 on make_editing_fixtures' image, given noise (AutoencoderTiny's
                         encode gives the latents: nothing to patch in retrieve_latents)
      kl_latents, kl_decoded, kl_images, kl_encoded    `AutoencoderKL.from_single_file` of an
                         original-layout (bare `encoder.*`, as vae-ft-mse-840000-ema-pruned) file of
                         an AutoencoderKL with tiny-sd1's VAE config and seed-1 weights
      kl_gen_image, kl_gen_float          tiny-sd1's pipeline with `pipe.vae` = that VAE
    reference.json       what was run, versions, and the checks this script asserts: diffusers'
                         single-file conversion returns exactly the written weights, and
                         madebyollin's original TAESD network (taesd.py's nn.Sequential, written
                         out below from its published definition) loads the original-layout
                         files strictly and decodes/encodes as diffusers does
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod  # noqa: E402
from PIL import Image  # noqa: E402

import make_editing_fixtures as mef  # noqa: E402
import make_parity_fixtures as mpf  # noqa: E402
from support import vae_files  # noqa: E402
from support.random_weights import random_state_dict  # noqa: E402
from tiny_specs import TINY_SPECS  # noqa: E402

OUT = vae_files.FIXTURES
_ACT = dict(encoder_block_out_channels=[12] * 4, decoder_block_out_channels=[12] * 4,
            num_encoder_blocks=[1, 2, 1, 2], num_decoder_blocks=[2, 1, 2, 1])
SPECS = {
    # tiny-sd1's latent grid (factor 8, 4 channels): the pipeline cases use it
    "tiny-taesd": dict(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
                       num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1]),
    "tiny-taesd-silu": dict(_ACT, act_fn="silu"),
    "tiny-taesd-gelu": dict(_ACT, act_fn="gelu"),
    "tiny-taesd-mish": dict(_ACT, act_fn="mish"),
}
LATENT_SIDE = {"tiny-taesd": 8}  # others: 4 (images 32 px)
STEPS, GUIDANCE, STRENGTH = 10, 7.5, 0.6


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def load_random(model, seed=0):
    """The random_weights values of every key (strict: all keys, all shapes); returns them."""
    state = random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return state


# ------------------------------------------------------------- madebyollin's taesd.py, written out
class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n, act):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), act(), nn.Conv2d(n, n, 3, padding=1), act(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_taesd(spec):
    """(Encoder, Decoder) as taesd.py builds them (input in [0, 1], output in [0, 1])."""
    act = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}[spec.get("act_fn", "relu")]
    c, latent = spec["encoder_block_out_channels"][0], 4
    enc = [nn.Conv2d(3, c, 3, padding=1)]
    for level, count in enumerate(spec["num_encoder_blocks"]):
        if level:
            enc.append(nn.Conv2d(c, c, 3, padding=1, stride=2, bias=False))
        enc += [_Block(c, act) for _ in range(count)]
    enc.append(nn.Conv2d(c, latent, 3, padding=1))
    c = spec["decoder_block_out_channels"][0]
    dec = [_Clamp(), nn.Conv2d(latent, c, 3, padding=1), act()]
    blocks = spec["num_decoder_blocks"]
    for level, count in enumerate(blocks):
        dec += [_Block(c, act) for _ in range(count)]
        if level < len(blocks) - 1:
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1, bias=False)]
        else:
            dec.append(nn.Conv2d(c, 3, 3, padding=1))
    return nn.Sequential(*enc).eval(), nn.Sequential(*dec).eval()


def _read(path):
    from safetensors.torch import load_file

    return load_file(path)


# ------------------------------------------------------------- cases
def taesd_cases(ref, meta, rng, write_configs):
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, spec in SPECS.items():
            vae = diffusers.AutoencoderTiny(**spec).eval()
            state = load_random(vae)
            if write_configs:
                vae.save_config(vae_files.fixture_dir(name))
            side = LATENT_SIDE.get(name, 4)
            ref[f"{name}_latents"] = rng.standard_normal((1, side, side, 4)).astype("float32")
            ref[f"{name}_images"] = rng.uniform(-1, 1, (1, 8 * side, 8 * side, 3)).astype("float32")
            ref[f"{name}_decoded"] = nhwc(vae.decode(nchw(ref[f"{name}_latents"])).sample)
            ref[f"{name}_encoded"] = nhwc(vae.encode(nchw(ref[f"{name}_images"])).latents)
            # madebyollin's own network on the original-layout files: strict load, same outputs.
            enc, dec = original_taesd(spec)
            enc_path, dec_path = vae_files.write_original_taesd(state, os.path.join(tmp, name))
            enc.load_state_dict(_read(enc_path), strict=True)
            dec.load_state_dict(_read(dec_path), strict=True)
            decoded = nhwc(dec(nchw(ref[f"{name}_latents"]))) * 2 - 1
            encoded = nhwc(enc(nchw((ref[f"{name}_images"] + 1) / 2)))
            errors = [float(np.abs(decoded - ref[f"{name}_decoded"]).max()),
                      float(np.abs(encoded - ref[f"{name}_encoded"]).max())]
            assert max(errors) < 1e-5, (name, errors)
            meta["original_taesd_vs_diffusers"][name] = errors

        full = diffusers.AutoencoderTiny().eval()
        load_random(full)
        config = {k: v for k, v in dict(full.config).items() if not k.startswith("_")}
        shapes = {k: list(v.shape) for k, v in full.state_dict().items()}
        if write_configs:
            with open(os.path.join(OUT, "taesd-full.json"), "w") as f:
                json.dump({"config": config, "shapes": shapes}, f, indent=1)
        ref["full_latents"] = rng.standard_normal((1, 4, 4, 4)).astype("float32")
        ref["full_images"] = rng.uniform(-1, 1, (1, 32, 32, 3)).astype("float32")
        ref["full_decoded"] = nhwc(full.decode(nchw(ref["full_latents"])).sample)
        ref["full_encoded"] = nhwc(full.encode(nchw(ref["full_images"])).latents)


def _pipeline(tokenizer):
    unet, vae, text_encoder, scheduler = mef.build("tiny-sd1", TINY_SPECS["tiny-sd1"])
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    txt2img = diffusers.StableDiffusionPipeline(**parts)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**parts)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img


def _generate(pipe, latents):
    parity = mpf
    out = pipe(parity.GEN_PROMPT, negative_prompt=parity.NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=parity.SIZE, width=parity.SIZE, latents=nchw(latents),
               output_type="np").images
    return out.astype("float32"), (out * 255).round().astype("uint8")


def pipeline_cases(ref, meta, rng):
    tiny = np.load(os.path.join(ROOT, "tests", "fixtures", "tiny-sd1", "reference.npz"))
    gen_latents = tiny["gen_latents"]
    given = mef._GivenNoise()
    img2img_mod.randn_tensor = given
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        mpf.tokenizer_folder(tmp, TINY_SPECS["tiny-sd1"]["pad_token"])
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)

        # TAESD in place of the model's VAE, as diffusers' docs do it.
        txt2img, img2img = _pipeline(tokenizer)
        taesd = diffusers.AutoencoderTiny(**SPECS["tiny-taesd"]).eval()
        load_random(taesd)
        txt2img.vae = taesd
        img2img.vae = taesd
        ref["taesd_gen_float"], ref["taesd_gen_image"] = _generate(txt2img, gen_latents)
        noise = rng.standard_normal((1, 8, 8, 4)).astype("float32")
        given.noise, given.calls = nchw(noise), 0
        out = img2img(prompt=mpf.GEN_PROMPT, negative_prompt=mpf.NEGATIVE, image=Image.fromarray(mef.test_image()),
                      strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images
        assert given.calls == 1, given.calls
        ref["taesd_img2img_noise"] = noise
        ref["taesd_img2img_float"] = out.astype("float32")
        ref["taesd_img2img_image"] = (out * 255).round().astype("uint8")

        # An AutoencoderKL from an original-layout single file (bare encoder.* / decoder.* keys).
        kl_config = TINY_SPECS["tiny-sd1"]["vae"]
        fresh = diffusers.AutoencoderKL(**kl_config)
        state = random_state_dict({k: tuple(v.shape) for k, v in fresh.state_dict().items()}, vae_files.KL_SEED)
        path = vae_files.write_original_vae(state, dict(fresh.config), os.path.join(tmp, "vae-original.safetensors"))
        kl = diffusers.AutoencoderKL.from_single_file(
            path, config=os.path.join(ROOT, "tests", "fixtures", "tiny-sd1"), subfolder="vae",
            local_files_only=True).eval()
        loaded = kl.state_dict()
        assert sorted(loaded) == sorted(state), sorted(set(loaded) ^ set(state))[:5]
        for key, value in state.items():  # diffusers' converter reads the file back exactly
            np.testing.assert_array_equal(loaded[key].reshape(value.shape).numpy(), value, err_msg=key)
        ref["kl_latents"] = rng.standard_normal((1, 8, 8, 4)).astype("float32")
        ref["kl_images"] = rng.uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
        ref["kl_decoded"] = nhwc(kl.decode(nchw(ref["kl_latents"])).sample)
        ref["kl_encoded"] = nhwc(kl.encode(nchw(ref["kl_images"])).latent_dist.mean)
        txt2img, _ = _pipeline(tokenizer)
        txt2img.vae = kl
        ref["kl_gen_float"], ref["kl_gen_image"] = _generate(txt2img, gen_latents)
        meta["kl_from_single_file"] = "exact: every weight as written"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", help="write the arrays to this .npz only (no configs, no reference.json)")
    args = p.parse_args()
    rng = np.random.default_rng(2468)
    ref = {}
    meta = {"specs": SPECS, "steps": STEPS, "guidance": GUIDANCE, "img2img_strength": STRENGTH,
            "prompt": mpf.GEN_PROMPT, "negative": mpf.NEGATIVE, "size": mpf.SIZE,
            "original_taesd_vs_diffusers": {}, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    if args.out is None:
        os.makedirs(OUT, exist_ok=True)
    taesd_cases(ref, meta, rng, write_configs=args.out is None)
    pipeline_cases(ref, meta, rng)
    if args.out is not None:
        np.savez_compressed(args.out, **ref)
        return
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2)
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **ref)
    print({k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    main()
