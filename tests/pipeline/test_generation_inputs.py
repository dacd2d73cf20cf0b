"""The catalogue of bad and unusual generation inputs, each with its documented outcome
(docs/security.md, "Generation"), and what happens when a generation overflows."""

import warnings

import numpy as np
import pytest

from diffusion_tf.text2image import NonFiniteOutputError, Text2Image

STEPS = 2

pytestmark = pytest.mark.xdist_group("tiny-sd1")  # shares the session's tiny pipelines (tests/conftest.py)


# ---------------------------------------------------------------- prompts: accepted
@pytest.mark.parametrize("prompt", [
    "@" * 100,  # 100 tokens: two 77-token chunks (A1111's rule), nothing truncated
    "<|endoftext|>",  # the literal special token: encoded as the end-of-text id, as transformers does
    "a cat 🐱🚀 on the moon",  # emoji
    "قطة على القمر",  # right-to-left text
    "",  # empty: the unconditional prompt
    "  \n\t ",  # whitespace only: the same as empty
])
def test_unusual_prompts_generate_an_image(pipe, prompt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = pipe.generate(prompt, num_steps=STEPS, seed=0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
    assert not [w for w in caught if "truncated" in str(w.message)]


def test_long_prompt_is_chunked_by_default_and_truncated_with_a_warning_as_diffusers(pipe, folder):
    long = "@" * 100
    assert tuple(pipe.encode_text(long).shape[:2]) == (1, 154)
    cut = Text2Image(model=folder, long_prompts="truncate")
    with pytest.warns(UserWarning, match="truncated"):
        context = cut.encode_text(long)
    assert tuple(context.shape[:2]) == (1, 77)
    # the first chunk of the long prompt is the truncated prompt's context (up to the float rounding
    # of a batch of two chunks against one)
    np.testing.assert_allclose(np.asarray(context), np.asarray(pipe.encode_text(long))[:, :77], atol=1e-5)


def test_special_token_and_blank_prompts_tokenize_as_documented(pipe):
    bos, eos = 49406, 49407
    ids = pipe.tokenize(["<|endoftext|>", "", "  \n\t "])
    assert list(ids[0][:3]) == [bos, eos, eos]  # the literal is the special id, then padding
    np.testing.assert_array_equal(ids[1], ids[2])  # whitespace-only == empty
    assert list(ids[1][:2]) == [bos, eos]


# ---------------------------------------------------------------- refused with ValueError
BAD_GENERATE = [
    ({"prompt": []}, "prompt=[]"),
    ({"prompt": None}, "prompt=None"),
    ({"num_steps": 0}, "num_steps=0"),
    ({"num_steps": -1}, "num_steps=-1"),
    ({"num_steps": 1001}, "num_steps=1001"),
    ({"num_steps": 1.5}, "num_steps=1.5"),
    ({"unconditional_guidance_scale": -1}, "unconditional_guidance_scale=-1"),
    ({"unconditional_guidance_scale": float("nan")}, "unconditional_guidance_scale=nan"),
    ({"unconditional_guidance_scale": float("inf")}, "unconditional_guidance_scale=inf"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": 2**32}, "seed=4294967296"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"seed": True}, "seed=True"),
    ({"latents": "nan"}, "NaN or Inf"),
    ({"latents": "inf"}, "NaN or Inf"),
    ({"latents": "shape"}, "latents has shape (1, 4, 4, 4)"),
    ({"original_size": (512, 512)}, "original_size=(512, 512): micro-conditioning is read by SDXL models only"),
    ({"aesthetic_score": 7}, "aesthetic_score=7.0: micro-conditioning is read by SDXL models only"),
]


@pytest.mark.parametrize("kwargs,message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_arguments_raise_value_error(pipe, kwargs, message):
    kwargs = dict(kwargs)
    if "latents" in kwargs:
        kind = kwargs["latents"]
        lat = np.zeros((1, 4, 4, 4) if kind == "shape" else (1, 8, 8, 4), np.float32)
        if kind != "shape":
            lat[0, 3, 5, 1] = np.nan if kind == "nan" else np.inf
        kwargs["latents"] = lat
    args = dict(prompt="a cat", num_steps=STEPS, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipe.generate(**args)
    assert message in str(e.value)


@pytest.mark.parametrize("size,message", [
    ((500, 512), "img_height=500; must be a positive multiple of 8"),
    ((0, 64), "img_height=0"),
    ((-64, 64), "img_height=-64"),
    ((64, 8192 + 4), "img_width=8196"),
    ((8192, 8192), "exceeds the pixel budget"),
])
def test_bad_sizes_are_refused_before_anything_is_built(tmp_path, size, message):
    # A model folder that does not exist: the size must be refused before the model is looked at.
    with pytest.raises(ValueError) as e:
        Text2Image(model=str(tmp_path / "no-such-model"), img_height=size[0], img_width=size[1])
    assert message in str(e.value)


# ---------------------------------------------------------------- overflow: never a silent black image
def _poison_decoder(pipe):
    """Make the VAE's decoder return +Inf pixels (what a float16 overflow produces)."""
    real = pipe.vae.decode

    def decode(z):
        return real(z) * np.float32("inf")

    pipe.vae.decode = decode


def test_overflowing_half_precision_vae_is_decoded_again_in_float32(folder):
    half = Text2Image(model=folder, img_height=64, img_width=64, dtype="mixed_float16")
    _poison_decoder(half)
    with pytest.warns(UserWarning, match="decoding again in float32"):
        image = half.generate("a cat", num_steps=STEPS, seed=3, unconditional_guidance_scale=1.0)
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    assert half._vae32.compute_dtype == "float32"
    # the float32 copy carries the VAE's weights: it decodes like the float32 pipeline
    full = Text2Image(model=folder, img_height=64, img_width=64)
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(half._vae32.decode(z)), np.asarray(full.vae.decode(z)), atol=1e-6)


def test_overflow_in_float32_raises_and_returns_nothing(folder):
    pipe = Text2Image(model=folder, img_height=64, img_width=64)
    _poison_decoder(pipe)
    with pytest.raises(NonFiniteOutputError, match="NaN or Inf pixels in float32"):
        pipe.generate("a cat", num_steps=STEPS, seed=3)


def test_nan_latents_from_the_unet_raise(folder):
    pipe = Text2Image(model=folder, img_height=64, img_width=64)
    real = pipe.unet.call

    def call(latents, timesteps, context):
        return real(latents, timesteps, context) * np.float32("nan")

    pipe.unet.call = call
    with pytest.raises(NonFiniteOutputError, match="NaN or Inf latents"):
        pipe.generate("a cat", num_steps=STEPS, seed=3, callback=lambda *a: None)
