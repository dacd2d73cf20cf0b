"""Parity with diffusers/transformers on the tiny SD 1.x-like and SD 2.x-like models.

Reference outputs come from scripts/make_parity_fixtures.py (committed); each model is
converted from a diffusers folder, an original .safetensors and an original .ckpt, and
every conversion must reproduce the reference:
  token ids equal (also for prompts with "!", tiny-sd2's pad token: each "!" is the pad id 0,
  as in transformers/diffusers); text encoder, UNet, VAE decode/encode within 1e-4 max abs error
  (relative to the output's scale where larger than 1); a 10-step DDIM generation with
  guidance 7.5, a negative prompt and given latents within 2/255.
"""

import numpy as np
import pytest

from support import tiny_models
from support.parity import assert_close

# Module-scoped fixtures are built once: under `-n 2` every test of this file goes to one worker.
pytestmark = pytest.mark.xdist_group("parity")

SOURCES = ("diffusers", "safetensors", "ckpt")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(name, source): model folder}, converted on first use (the default run needs a part)."""
    from weights_port.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("parity")

    class Folders(dict):
        def __missing__(self, key):
            name, source = key
            if source == "diffusers":
                src, config = tiny_models.write_diffusers_folder(name, str(root / f"{name}-diffusers")), None
            else:
                ext = {"safetensors": ".safetensors", "ckpt": ".ckpt"}[source]
                src = tiny_models.write_single_file(name, str(root / f"{name}{ext}"))
                config = tiny_models.fixture_dir(name)
            self[key] = convert_checkpoint(src, str(root / f"{name}-{source}-converted"), config=config,
                                           log=lambda *_: None)
            return self[key]

    return Folders()


@pytest.fixture(scope="module")
def pipelines(converted):
    from diffusion_tf import Text2Image

    class Pipelines(dict):
        def __missing__(self, key):
            self[key] = Text2Image(model=converted[key], img_height=64, img_width=64)
            return self[key]

    return Pipelines()


# Every source of every model is checked; the default run checks each single-file format on one
# model (sd1 from .safetensors, sd2 from .ckpt), the other two with the heavy checks (CI's second step).
DEFAULT_CASES = {(name, "diffusers") for name in tiny_models.NAMES} | {("tiny-sd1", "safetensors"), ("tiny-sd2", "ckpt")}
CASES = [c if c in DEFAULT_CASES else pytest.param(*c, marks=pytest.mark.heavy)
         for c in ((name, source) for name in tiny_models.NAMES for source in SOURCES)]


@pytest.mark.parametrize("name,source", CASES)
def test_token_ids(pipelines, name, source):
    ref = tiny_models.reference(name)
    prompts = ref["meta"]["prompts"] + [ref["meta"]["negative"]]
    np.testing.assert_array_equal(pipelines[(name, source)].tokenize(prompts), ref["ids"])


@pytest.mark.parametrize("name,source", CASES)
def test_text_encoder(pipelines, name, source):
    ref = tiny_models.reference(name)
    pipe = pipelines[(name, source)]
    assert_close(pipe.text_encoder(ref["ids"]), ref["text_embeds"], "text encoder")


@pytest.mark.parametrize("name,source", CASES)
def test_prompts_with_the_pad_character(pipelines, name, source):
    from diffusion_tf.clip_tokenizer import CLIPTokenizer

    ref = tiny_models.reference(name)
    pipe = pipelines[(name, source)]
    prompts = ref["meta"]["bang_prompts"]
    ids = pipe.tokenize(prompts)
    np.testing.assert_array_equal(ids, ref["bang_ids"])
    assert_close(pipe.text_encoder(ids), ref["bang_text_embeds"], "text encoder (prompts with '!')")
    # With pad "!" (tiny-sd2) open_clip's tokenization of these prompts differs from the reference's;
    # with pad EOS (tiny-sd1) it is the same.
    text = CLIPTokenizer(pad_token_id=pipe.tokenizer.pad_token_id, pad_token_in_prompt="text")(prompts)
    assert np.array_equal(text, ref["bang_ids"]) == (name == "tiny-sd1")


@pytest.mark.parametrize("name,source", CASES)
def test_unet(pipelines, name, source):
    ref = tiny_models.reference(name)
    out = pipelines[(name, source)].predict_noise(ref["unet_latents"], ref["unet_timesteps"], ref["unet_context"])
    assert_close(out, ref["unet_out"], "UNet")


@pytest.mark.parametrize("name,source", CASES)
def test_vae(pipelines, name, source):
    ref = tiny_models.reference(name)
    vae = pipelines[(name, source)].vae
    assert_close(vae.decode(ref["vae_latents"]), ref["vae_decoded"], "VAE decode")
    assert_close(vae.encode(ref["vae_images"]), ref["vae_encoded"], "VAE encode")


# The single files' conversions give bit-identical weights to the folder's (tested below), so
# their generations repeat it: they run with the heavy checks (CI's second step).
GENERATION_CASES = [(name, "diffusers") if source == "diffusers" else pytest.param(name, source, marks=pytest.mark.heavy)
                    for name in tiny_models.NAMES for source in SOURCES]


@pytest.mark.parametrize("name,source", GENERATION_CASES)
def test_generation(pipelines, name, source):
    ref = tiny_models.reference(name)
    meta = ref["meta"]
    image = pipelines[(name, source)].generate(
        meta["gen_prompt"], negative_prompt=meta["negative"], num_steps=meta["gen_steps"],
        unconditional_guidance_scale=meta["guidance"], latents=ref["gen_latents"],
    )
    assert image.dtype == np.uint8 and image.shape == ref["gen_image"].shape
    diff = np.abs(image.astype(int) - ref["gen_image"].astype(int)).max()
    assert diff <= 2, f"generation differs from diffusers by {diff}/255"


@pytest.mark.parametrize("name", ["tiny-sd1", pytest.param("tiny-sd2", marks=pytest.mark.heavy)])
def test_all_sources_give_identical_weights(converted, name):
    from diffusion_tf.state_dict import read_weights

    for component in ("text_encoder", "unet", "vae"):
        base = read_weights(f"{converted[(name, 'diffusers')]}/{component}.weights.h5")
        for source in ("safetensors", "ckpt"):
            other = read_weights(f"{converted[(name, source)]}/{component}.weights.h5")
            assert base.keys() == other.keys()
            for key in base:
                np.testing.assert_array_equal(base[key], other[key], err_msg=f"{source} {component} {key}")
