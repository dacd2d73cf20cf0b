"""Guidance-distilled (LCM) models in the pipeline, against diffusers' LatentConsistencyModelPipeline.

The tiny-lcm model (tiny-sd1 with `time_cond_proj_dim=16`; fixtures from scripts/make_lcm_fixtures.py)
takes the guidance scale as an input: w = scale - 1 embedded as diffusers' `get_guidance_scale_embedding`
(1000 w, sinusoidal) goes into the UNet's `timestep_cond`, and no unconditional pass runs. Checked: the
embedding, the UNet with it (1e-4), and 1-, 2- and 4-step `lcm` generations from given latents within
2/255, the fresh noise of each step being the pipeline's own draws for the seed (the fixture script gave
diffusers the same draws); the model's defaults; the UNet calls a generation makes (counted through a
wrapper of the public `unet` attribute, run eagerly); `lcm` on a model that is not distilled, and
image-to-image with it.
"""

import numpy as np
import pytest

from support import tiny_models
from support.parity import assert_close

pytestmark = pytest.mark.xdist_group("lcm")


@pytest.fixture(scope="module")
def ref():
    return tiny_models.reference("tiny-lcm")


@pytest.fixture(scope="module")
def folder():
    return tiny_models.converted_folder("tiny-lcm")


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusion_tf import Text2Image

    return Text2Image(model=folder, img_height=64, img_width=64)


def assert_image(image, expected, what):
    assert image.dtype == np.uint8 and image.shape == expected.shape, (what, image.shape, expected.shape)
    diff = int(np.abs(image.astype(int) - expected.astype(int)).max())
    assert diff <= 2, f"{what}: differs from diffusers by {diff}/255"
    return diff


def generate_case(pipe, ref, case, **kwargs):
    c = ref["meta"]["cases"][case]
    return pipe.generate(c["prompts"], num_steps=c["steps"], unconditional_guidance_scale=c["guidance"],
                         seed=c["seed"], latents=ref[f"{case}_latents"], **kwargs)


# ---------------------------------------------------------------- pieces
def test_guidance_scale_embedding_matches_diffusers(ref):
    from diffusion_tf.layers.embeddings import guidance_scale_embedding

    for dim in (16, 7):
        ours = np.asarray(guidance_scale_embedding(ref["emb_w"], dim))
        # sin/cos of arguments up to 7500 (w = 7.5): the frequencies are float32 as diffusers' (6e-8 here)
        np.testing.assert_allclose(ours, ref[f"emb_{dim}"], rtol=0, atol=1e-5, err_msg=f"dim {dim}")
    assert np.all(np.asarray(guidance_scale_embedding(ref["emb_w"], 7))[:, -1] == 0)  # odd: zero-padded
    for dim in (3, 0, 2.0, True):
        with pytest.raises(ValueError, match=f"dim={dim!r}; must be an integer >= 4"):
            guidance_scale_embedding(ref["emb_w"], dim)


def test_unet_with_the_guidance_embedding_matches_diffusers(pipe, ref):
    out = pipe.unet(ref["unet_latents"], ref["unet_timesteps"], ref["unet_context"], timestep_cond=ref["unet_cond"])
    assert_close(out, ref["unet_out"], "UNet with timestep_cond")
    # the embedding changes the output (it is not ignored)
    other = pipe.unet(ref["unet_latents"], ref["unet_timesteps"], ref["unet_context"],
                      timestep_cond=np.zeros_like(ref["unet_cond"]))
    assert np.abs(np.asarray(other) - ref["unet_out"]).max() > 1e-2
    with pytest.raises(ValueError, match="timestep_cond"):
        pipe.unet(ref["unet_latents"], ref["unet_timesteps"], ref["unet_context"])


def test_defaults_of_a_distilled_model(pipe):
    assert pipe.defaults == {"num_steps": 4, "guidance": 8.5, "scheduler": "lcm"}
    assert pipe.scheduler.name == "lcm" and pipe.unet.time_cond_proj_dim == 16
    # the folder's LCMScheduler config reaches the scheduler
    assert pipe.scheduler.original_inference_steps == 50 and pipe.scheduler.timestep_scaling == 10.0


# ---------------------------------------------------------------- generation parity
@pytest.mark.parametrize("case", ["lcm4", pytest.param("lcm2_w0", marks=pytest.mark.heavy),
                                  pytest.param("lcm1", marks=pytest.mark.heavy)])
def test_generation_matches_latent_consistency_pipeline(pipe, ref, case):
    import tensorflow as tf

    from diffusion_tf.pipeline import sampling

    c = ref["meta"]["cases"][case]
    # the fixture gave diffusers' scheduler the pipeline's own fresh noise for this seed
    plan = sampling.Plan(pipe.get_scheduler("lcm"), seed=tf.constant(c["seed"], "int64"))
    pipe.get_scheduler("lcm").set_timesteps(c["steps"])
    for i, expected in enumerate(ref[f"{case}_noise"]):
        np.testing.assert_array_equal(np.asarray(sampling.step_noise(plan, tf.zeros(expected.shape), i)), expected)
    kwargs = {} if case == "lcm4" else {"scheduler": "lcm"}  # lcm4: the model's default scheduler
    assert_image(generate_case(pipe, ref, case, **kwargs), ref[f"{case}_image"], case)


@pytest.mark.heavy  # two more generations; CI's second step
def test_another_seed_changes_the_injected_noise(pipe, ref):
    """Between steps LCM adds fresh noise drawn from the seed: the same latents with another seed give
    another image (one step draws none: the same image)."""
    base = generate_case(pipe, ref, "lcm4")
    c = ref["meta"]["cases"]["lcm4"]
    other = pipe.generate(c["prompts"], num_steps=4, unconditional_guidance_scale=c["guidance"], seed=c["seed"] + 1,
                          latents=ref["lcm4_latents"])
    assert np.abs(other.astype(int) - base.astype(int)).max() > 10
    c1 = ref["meta"]["cases"]["lcm1"]
    again = pipe.generate(c1["prompts"], num_steps=1, unconditional_guidance_scale=c1["guidance"], seed=99,
                          latents=ref["lcm1_latents"])
    np.testing.assert_array_equal(again, generate_case(pipe, ref, "lcm1"))


@pytest.mark.heavy  # compiles the tiny pipeline with XLA
def test_xla_generation_with_the_guidance_embedding(folder, ref):
    from diffusion_tf import Text2Image

    xla = Text2Image(model=folder, img_height=64, img_width=64, jit_compile=True)
    assert_image(generate_case(xla, ref, "lcm1"), ref["lcm1_image"], "lcm1 (XLA)")
    out = generate_case(xla, ref, "lcm4")  # XLA's stateless normal draws differ from the graph's
    assert out.shape == ref["lcm4_image"].shape and out.std() > 5


# ---------------------------------------------------------------- UNet calls
class CountingUNet:
    """The pipeline's UNet, recording (batch, whether timestep_cond came) of every call."""

    def __init__(self, unet):
        self._unet = unet
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._unet, name)

    def __call__(self, latents, *args, **kwargs):
        self.calls.append((int(latents.shape[0]), kwargs.get("timestep_cond") is not None))
        return self._unet(latents, *args, **kwargs)


def count_calls(folder, **kwargs):
    """The UNet calls of one generation, run eagerly (every call of the loop is a Python call)."""
    import tensorflow as tf

    from diffusion_tf import Text2Image

    pipe = Text2Image(model=folder, img_height=64, img_width=64)
    counter = pipe.unet = CountingUNet(pipe.unet)
    tf.config.run_functions_eagerly(True)
    try:
        image = pipe.generate(["a cat", "a dog"], seed=1, **kwargs)
    finally:
        tf.config.run_functions_eagerly(False)
    assert image.shape == (2, 64, 64, 3)
    return counter.calls


def test_distilled_model_runs_no_unconditional_pass(folder, tiny_folder):
    # guidance 0 and the default 8.5 alike: one call per step, one row per image, with the embedding
    assert count_calls(folder, num_steps=1, unconditional_guidance_scale=0.0) == [(2, True)]
    assert count_calls(folder, num_steps=2, negative_prompt="blurry") == [(2, True), (2, True)]


@pytest.mark.heavy  # two more eager generations; CI's second step
def test_an_ordinary_model_with_lcm_guides_as_usual(tiny_folder):
    # an ordinary model with lcm (LCM-LoRA's way): guidance <= 1 one pass, above 1 the batched pair
    assert count_calls(tiny_folder, num_steps=1, unconditional_guidance_scale=0.0, scheduler="lcm") == [(2, False)]
    assert count_calls(tiny_folder, num_steps=1, unconditional_guidance_scale=1.5, scheduler="lcm") == [(4, False)]


# ---------------------------------------------------------------- other models, image-to-image
def test_lcm_on_a_model_that_is_not_distilled(tiny_pipe):
    """Allowed, as in diffusers: any UNet runs with lcm (quality is the user's concern: a model not
    distilled for it gives a blurred image in few steps); the result differs from DDIM's."""
    lcm = tiny_pipe.generate("a cat", num_steps=4, seed=3, scheduler="lcm")
    ddim = tiny_pipe.generate("a cat", num_steps=4, seed=3, scheduler="ddim")
    assert lcm.shape == (1, 64, 64, 3) and lcm.std() > 5
    assert np.abs(lcm.astype(int) - ddim.astype(int)).max() > 10
    with pytest.raises(ValueError, match="num_steps=60 exceeds original_inference_steps=50"):
        tiny_pipe.generate("a cat", num_steps=60, scheduler="lcm")


def test_image_to_image_with_lcm_starts_part_way(pipe):
    """The pipeline's image-to-image is diffusers' StableDiffusionImg2ImgPipeline's for every scheduler
    (LCM-LoRA's documented img2img): int(num_steps x strength) steps of the num_steps schedule run, from
    the image noised to the first of them."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    calls = []
    out = pipe.generate("a cat", init_image=image, strength=0.5, num_steps=4, seed=2,
                        callback=lambda k, n, t: calls.append((n, t)))
    assert calls == [(2, 499), (2, 259)]  # the 4-step schedule is 999, 759, 499, 259
    assert out.shape == (1, 64, 64, 3) and out.std() > 5
