"""The one sampling loop (`diffusion_tf.pipeline.sampling`), on a toy denoiser: the fused
loop equals the step-by-step loop, guidance is the classifier-free formula, and the
known region of inpainting follows the image."""

import numpy as np
import pytest
import tensorflow as tf

from diffusion_tf import schedulers
from diffusion_tf.pipeline import sampling


def toy_unet(x, t, context):
    """A smooth function of the input, the timestep and the context (one row per sample)."""
    c = tf.reshape(tf.reduce_mean(context, axis=[1, 2]), (-1, 1, 1, 1))
    return tf.sin(x * 0.7 + c) * 0.3 + tf.cast(t, "float32") * 1e-4


def _inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    latents = tf.constant(rng.standard_normal((batch, 4, 4, 4)).astype("float32"))
    uncond = rng.standard_normal((batch, 3, 2)).astype("float32")
    cond = rng.standard_normal((batch, 3, 2)).astype("float32")
    return latents, tf.constant(np.concatenate([uncond, cond])), tf.constant(cond)


@pytest.mark.parametrize("name", ["ddim", "euler_a", "heun", "dpm++2m-karras"])
def test_fused_loop_equals_the_step_by_step_loop(name):
    sched = schedulers.get(name)
    sched.set_timesteps(6)
    latents, context, _ = _inputs()
    plan = sampling.Plan(sched, guidance=5.0, use_guidance=True, seed=3)
    fused = sampling.denoise(toy_unet, plan, latents * sched.init_noise_sigma, context)
    x, state = latents * sched.init_noise_sigma, sched.init_state(latents)
    for i in range(len(sched.timesteps)):
        x, state, _ = sampling.denoise_step(toy_unet, plan, x, state, i, context)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_guided_output_is_the_classifier_free_formula():
    sched = schedulers.get("ddim")
    sched.set_timesteps(4)
    latents, context, cond_context = _inputs()
    half = context.shape[0] // 2
    plan = sampling.Plan(sched, guidance=7.5, use_guidance=True)
    guided = sampling.model_output(toy_unet, plan, latents, 1, context)
    t = sched.model_timestep(1)
    uncond, cond = toy_unet(latents, t, context[:half]), toy_unet(latents, t, context[half:])
    np.testing.assert_allclose(np.asarray(guided), np.asarray(uncond + 7.5 * (cond - uncond)), rtol=1e-5, atol=1e-6)
    plain = sampling.Plan(sched, guidance=7.5, use_guidance=False)
    np.testing.assert_allclose(np.asarray(sampling.model_output(toy_unet, plain, latents, 1, cond_context)),
                               np.asarray(cond), rtol=1e-6)


def test_start_index_skips_the_first_steps():
    sched = schedulers.get("ddim")
    sched.set_timesteps(5)
    latents, context, _ = _inputs()
    plan = sampling.Plan(sched, guidance=3.0, use_guidance=True)
    x, state = latents, sched.init_state(latents)
    for i in range(2, 5):
        x, state, _ = sampling.denoise_step(toy_unet, plan, x, state, i, context)
    np.testing.assert_allclose(np.asarray(sampling.denoise(toy_unet, plan, latents, context, start=2)),
                               np.asarray(x), rtol=1e-5, atol=1e-6)


def test_stochastic_noise_depends_on_seed_and_step_only():
    sched = schedulers.get("euler_a")
    sched.set_timesteps(3)
    latents, _, _ = _inputs()
    a = sampling.Plan(sched, seed=7, temperature=1.0)
    b = sampling.Plan(sched, seed=8, temperature=1.0)
    np.testing.assert_array_equal(sampling.step_noise(a, latents, 1), sampling.step_noise(a, latents, 1))
    assert not np.array_equal(sampling.step_noise(a, latents, 1), sampling.step_noise(a, latents, 2))
    assert not np.array_equal(sampling.step_noise(a, latents, 1), sampling.step_noise(b, latents, 1))
    cold = sampling.Plan(sched, seed=7, temperature=0.0)
    assert not np.any(np.asarray(sampling.step_noise(cold, latents, 1)))
    assert sampling.step_noise(sampling.Plan(schedulers.get("ddim")), latents, 0) is None


def test_known_region_ends_as_the_image_latents():
    sched = schedulers.get("ddim")
    sched.set_timesteps(4)
    latents, context, _ = _inputs()
    image_latents = tf.ones_like(latents) * 0.25
    mask = np.zeros((1, 4, 4, 1), "float32")
    mask[:, :2] = 1.0  # the top half is repainted
    cond = {"mask": tf.constant(mask), "image_latents": image_latents, "noise": latents}
    plan = sampling.Plan(sched, guidance=2.0, use_guidance=True, cond=cond)
    out = np.asarray(sampling.denoise(toy_unet, plan, latents, context))
    np.testing.assert_array_equal(out[:, 2:], 0.25)  # kept: the un-noised image latents after the last step
    assert not np.allclose(out[:, :2], 0.25)


def test_timestep_cond_goes_through_the_plan():
    """A guidance-distilled UNet gets `plan.timestep_cond` (one row per UNet input row); others get nothing."""
    sched = schedulers.get("lcm")
    sched.set_timesteps(4)
    latents, context, cond_context = _inputs()
    seen = []

    def distilled_unet(x, t, context, timestep_cond=None):
        seen.append(None if timestep_cond is None else tuple(timestep_cond.shape))
        return toy_unet(x, t, context) + tf.reshape(tf.reduce_sum(timestep_cond, axis=1), (-1, 1, 1, 1))

    class Distilled:  # what guidance_condition reads off a UNet
        time_cond_proj_dim = 8

    cond = sampling.guidance_condition(Distilled(), tf.constant(3.0), 2)
    assert tuple(cond.shape) == (2, 8) and sampling.guidance_condition(toy_unet, 3.0, 2) is None
    plan = sampling.Plan(sched, guidance=3.0, timestep_cond=cond)
    out = sampling.model_output(distilled_unet, plan, latents, 1, cond_context)
    t = sched.model_timestep(1)
    expected = toy_unet(latents, t, cond_context) + tf.reshape(tf.reduce_sum(cond, axis=1), (-1, 1, 1, 1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6)
    guided = sampling.Plan(sched, guidance=3.0, use_guidance=True, timestep_cond=cond)
    sampling.model_output(distilled_unet, guided, latents, 1, context)
    assert seen == [(2, 8), (4, 8)]
    sampling.model_output(toy_unet, sampling.Plan(sched), latents, 1, cond_context)  # no timestep_cond argument
