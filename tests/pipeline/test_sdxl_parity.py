"""Parity with diffusers' SDXL pipelines on the tiny SDXL-like models.

Reference outputs come from scripts/make_sdxl_fixtures.py (committed): tiny-sdxl (two text
encoders of widths 32 and 48, per-level transformer depths, a first level without attention),
tiny-sdxl-refiner (the second encoder only, aesthetic score) and tiny-sdxl-inpaint (9-channel
UNet). Each is converted from a diffusers folder and from an SGM single file; both must give:
  token ids of both tokenizers equal; prompt_embeds, pooled_prompt_embeds (with a negative prompt,
  with none: zeros where force_zeros_for_empty_prompt, clip_skip 1), the UNet with added
  conditions, VAE decode/encode within 1e-4 (relative to the output's scale where larger than 1).
On the folder's conversion (the single file's weights are bit-identical: tests/convert), within
2/255 of diffusers: 10-step Euler generations with guidance 5 and given latents (a negative
prompt; none at 64x96; micro-conditioning with guidance_rescale 0.7), the base -> refiner
hand-off (denoising_end / denoising_start 0.8), image-to-image on base and refiner and 4- and
9-channel inpainting.
The prompts hold "!" (tokenizer_2's pad), unicode and "(emphasis:1.2)": diffusers has no prompt
syntax, so the pipelines use prompt_syntax="plain".
"""

import numpy as np
import pytest

from support import tiny_models
from support.parity import assert_close

pytestmark = pytest.mark.xdist_group("sdxl")

# The SGM conversions' weights are bit-identical to the folders' (tests/convert/test_convert_sdxl.py):
# their component checks run with the heavy tests.
CASES = [pytest.param(name, source, marks=() if source == "diffusers" else pytest.mark.heavy)
         for name in tiny_models.SDXL_NAMES for source in tiny_models.SDXL_SOURCES]


@pytest.fixture(scope="module")
def pipelines(tiny_sdxl_pipes):
    return tiny_sdxl_pipes


def ref_of(name):
    return tiny_models.reference(name)


@pytest.mark.parametrize("name,source", CASES)
def test_token_ids_of_both_tokenizers(pipelines, name, source):
    ref, pipe = ref_of(name), pipelines[(name, source)]
    texts = ref["meta"]["prompts"] + [ref["meta"]["negative"]]
    np.testing.assert_array_equal(pipe.tokenizer_2(texts), ref["ids_2"])
    if "ids_1" in ref:
        np.testing.assert_array_equal(pipe.tokenizer(texts), ref["ids_1"])
        assert not np.array_equal(ref["ids_1"], ref["ids_2"])  # the pads differ: "!" is id 0 in tokenizer_2


@pytest.mark.parametrize("name,source", CASES)
def test_prompt_embeds_and_pooled(pipelines, name, source):
    ref, pipe = ref_of(name), pipelines[(name, source)]
    prompts, negative = ref["meta"]["prompts"], ref["meta"]["negative"]
    context, pooled = pipe.encode_text(prompts)
    assert_close(context, ref["embeds"], "prompt_embeds")
    assert_close(pooled, ref["pooled"], "pooled_prompt_embeds")
    context, pooled = pipe.encode_text([negative] * len(prompts))
    assert_close(context, ref["neg_embeds"], "negative_prompt_embeds")
    assert_close(pooled, ref["neg_pooled"], "negative_pooled_prompt_embeds")
    assert_close(pipe.encode_text(prompts, clip_skip=1)[0], ref["skip1_embeds"], "prompt_embeds, clip_skip=1")


@pytest.mark.parametrize("name,source", CASES)
def test_unet_with_added_conditions(pipelines, name, source):
    ref, pipe = ref_of(name), pipelines[(name, source)]
    out = pipe.predict_noise(ref["unet_latents"], ref["unet_timesteps"], ref["embeds"],
                             added_cond={"text_embeds": ref["pooled"], "time_ids": ref["unet_time_ids"]})
    assert_close(out, ref["unet_out"], "UNet")


@pytest.mark.parametrize("name,source", CASES)
def test_vae(pipelines, name, source):
    ref, pipe = ref_of(name), pipelines[(name, source)]
    assert_close(pipe.vae.decode(ref["vae_latents"]), ref["vae_decoded"], "VAE decode")
    assert_close(pipe.vae.encode(ref["vae_images"]), ref["vae_encoded"], "VAE encode")
    assert pipe.vae.scaling_factor == pytest.approx(0.13025)


def assert_image(out, expected, what):
    assert out.dtype == np.uint8 and out.shape == expected.shape, (what, out.shape, expected.shape)
    diff = int(np.abs(out.astype(int) - expected.astype(int)).max())
    assert diff <= 2, f"{what}: differs from diffusers by {diff}/255"


def base_args(ref, **kw):
    meta = ref["meta"]
    args = dict(num_steps=meta["steps"], unconditional_guidance_scale=meta["guidance"], scheduler="euler")
    args.update(kw)
    return args


# Each case compiles its own loop (~12 s here): the default run keeps one of each kind, the rest run
# with the heavy checks (CI's second step).
HEAVY = pytest.mark.heavy


@pytest.mark.parametrize("case", ["gen_neg", pytest.param("gen_none", marks=HEAVY), pytest.param("gen_cond", marks=HEAVY)])
def test_text_to_image(pipelines, case):
    ref = ref_of("tiny-sdxl")
    meta = ref["meta"]
    kw = {"negative_prompt": meta["negative"]} if case != "gen_none" else {}
    if case == "gen_cond":
        kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in meta["micro"].items()})
    latents = ref[f"{case}_latents"]
    out = pipelines[("tiny-sdxl", "diffusers")].generate(
        meta["prompts"][0], latents=latents, height=8 * latents.shape[1], width=8 * latents.shape[2],
        **base_args(ref, **kw))
    assert_image(out, ref[f"{case}_image"], case)


@HEAVY
def test_no_negative_prompt_is_not_the_empty_prompt(pipelines):
    """force_zeros_for_empty_prompt: zeros, not the encoded "" (which would change the image)."""
    ref = ref_of("tiny-sdxl")
    pipe = pipelines[("tiny-sdxl", "diffusers")]
    latents = ref["gen_none_latents"]
    out = pipe.generate(ref["meta"]["prompts"][0], negative_prompt="", latents=latents, height=64, width=96,
                        **base_args(ref))
    assert np.abs(out.astype(int) - ref["gen_none_image"].astype(int)).max() > 2


@pytest.mark.heavy  # 10-20 s: with CI's heavy run, out of the default suite's time
def test_base_to_refiner_hand_off(pipelines):
    base_ref, refiner_ref = ref_of("tiny-sdxl"), ref_of("tiny-sdxl-refiner")
    meta = base_ref["meta"]
    base = pipelines[("tiny-sdxl", "diffusers")]
    refiner = pipelines[("tiny-sdxl-refiner", "diffusers")]
    latents = base.generate(meta["prompts"][0], latents=base_ref["handoff_start_latents"], output_type="latent",
                            denoising_end=meta["handoff"], **base_args(base_ref, negative_prompt=meta["negative"]))
    assert_close(latents, base_ref["handoff_latents"], "base latents at denoising_end", tol=1e-3)
    out = refiner.generate(meta["prompts"][0], init_latents=latents, denoising_start=meta["handoff"],
                           **base_args(base_ref, negative_prompt=meta["negative"]))
    assert_image(out, refiner_ref["handoff_image"], "refiner from the base's latents")


DEFAULT_EDITING = {("tiny-sdxl", "img2img_0.6"), ("tiny-sdxl-inpaint", "inpaint_1.0")}
EDITING = [pytest.param(name, case["name"], case["kind"], case["strength"],
                        marks=() if (name, case["name"]) in DEFAULT_EDITING else HEAVY)
           for name in tiny_models.SDXL_NAMES for case in ref_of(name)["meta"]["cases"] if "strength" in case]


@pytest.mark.parametrize("name,case,kind,strength", EDITING)
def test_editing(pipelines, name, case, kind, strength):
    ref = ref_of(name)
    meta = ref["meta"]
    kw = dict(negative_prompt=meta["negative"], init_image=ref["image"], strength=strength)
    if kind == "inpaint":
        kw.update(mask=ref["mask"], paste_back=False)
    kw["latents"] = ref[f"{case}_latents"] if strength == 1.0 else ref[f"{case}_noise"]
    out = pipelines[(name, "diffusers")].generate(meta["prompts"][0], **base_args(ref, **kw))
    assert_image(out, ref[f"{case}_image"], f"{name} {case}")


def test_refiner_cannot_generate_from_noise(pipelines):
    with pytest.raises(ValueError, match="refiner"):
        pipelines[("tiny-sdxl-refiner", "diffusers")].generate("a cat", num_steps=2)


@HEAVY
def test_the_fused_xla_loop_and_other_schedulers_and_attention(pipelines):
    """The SDXL pipeline is the SD one: the XLA loop gives the graph loop's image, every scheduler and
    LinearAttention run (LinearAttention is an approximation: it only has to give a finite image)."""
    from diffusion_tf import Text2Image

    ref = ref_of("tiny-sdxl")
    meta = ref["meta"]
    folder = pipelines[("tiny-sdxl", "diffusers")].model_path
    kw = base_args(ref, negative_prompt=meta["negative"], latents=ref["gen_neg_latents"])
    xla = Text2Image(model=folder, img_height=64, img_width=64, prompt_syntax="plain", jit_compile=True)
    assert_image(xla.generate(meta["prompts"][0], **kw), ref["gen_neg_image"], "XLA loop")
    for scheduler in ("dpm++2m-karras", "euler_a", "ddim", "heun"):
        out = xla.generate(meta["prompts"][0], **{**kw, "scheduler": scheduler, "num_steps": 3})
        assert out.shape == (1, 64, 64, 3) and out.std() > 5, scheduler
    linear = Text2Image(model=folder, img_height=64, img_width=64, attention="linear")
    out = linear.generate(meta["prompts"][0], num_steps=3, seed=1)
    assert out.shape == (1, 64, 64, 3) and out.std() > 5


@HEAVY
def test_outpainting_with_the_9_channel_model(pipelines):
    """Outpainting is inpainting on a grown canvas: the old area is the input's exactly."""
    ref = ref_of("tiny-sdxl-inpaint")
    pipe = pipelines[("tiny-sdxl-inpaint", "diffusers")]
    out = pipe.generate("a photo", init_image=ref["image"], outpaint={"right": 16, "top": 8}, num_steps=3, seed=2,
                        scheduler="euler")
    assert out.shape == (1, 72, 80, 3)
    np.testing.assert_array_equal(out[0, 8:, :64], ref["image"])
    assert out[0, :8].std() > 1 and out[0, :, 64:].std() > 1
