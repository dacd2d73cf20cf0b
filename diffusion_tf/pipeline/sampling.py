"""The one sampling loop: classifier-free guidance and denoising over a schedule.

Text-to-image, image-to-image, inpainting, training's refinement stage and its pictures
all run these functions, eagerly, in a graph or inside one XLA-compiled function:

    scheduler.set_timesteps(n)
    plan = Plan(scheduler, tables, guidance=7.5, seed=seed)
    latents = denoise(unet, plan, latents, context)           # ops.fori_loop over the steps

`unet(x, t, context)` is the raw denoising network. `context` holds the unconditional rows
first, then the conditional ones, when `plan.use_guidance` (one batched UNet call per step
for both passes); `plan.added` holds an SDXL UNet's added conditions (pooled text embedding and
micro-conditioning time ids), rows in the same order; `plan.timestep_cond` a guidance-distilled
UNet's guidance embedding (`guidance_condition`: LCM models take the guidance scale as an input
and run no unconditional pass). The scheduler is used through its index-based functional core
(`init_state`, `scale_model_input_at`, `model_timestep`, `step_fn`), so the loop index may
be a tensor. Editing conditions (`plan.cond`):
  {"extra": [B, h, w, 5]}   mask + masked-image latents, appended to a 9-channel UNet's input;
  {"mask", "image_latents", "noise"}   the known region of a 4-channel UNet, blended back
                                       after every step, noised to the next timestep.
"""

import dataclasses
from typing import Any

import tensorflow as tf
from keras import ops

from diffusion_tf.layers.embeddings import guidance_scale_embedding
from diffusion_tf.pipeline.editing import add_noise_at


@dataclasses.dataclass
class Plan:
    """What stays fixed over one generation's loop. `tables`: the scheduler's per-index
    tables as tensors (default: its NumPy tables; pass tensors into a compiled function so
    that another step count reuses it). `guidance`: the classifier-free guidance scale;
    `use_guidance`: whether the unconditional pass runs (a Python bool: it changes the
    graph). `seed`, `temperature`: the fresh noise of stochastic samplers. `added`: an SDXL
    UNet's `added_cond` ({"text_embeds", "time_ids"}, unconditional rows first), or None.
    `guidance_rescale`: diffusers' rescale of the guided output (Lin et al. 2023, eq. 15-16), or
    None (not in the graph at all). `timestep_cond`: [B, D] the UNet's `timestep_cond` (a
    guidance-distilled UNet's guidance embedding, `guidance_condition`), or None."""

    scheduler: Any
    tables: Any = None
    guidance: Any = 1.0
    use_guidance: bool = False
    seed: Any = 0
    temperature: Any = 1.0
    cond: dict = dataclasses.field(default_factory=dict)
    added: Any = None
    guidance_rescale: Any = None
    timestep_cond: Any = None

    def __post_init__(self):
        if self.tables is None:
            self.tables = dict(self.scheduler.tables)

    @property
    def num_indices(self):
        """len(timesteps): the loop's end index (a tensor inside a compiled function)."""
        return ops.shape(self.tables["model_timesteps"])[0]


def guidance_embedded(unet):
    """Whether `unet` is guidance-distilled (diffusers' `time_cond_proj_dim` set, as LCM's): the
    guidance scale is then an input of the network, not a second (unconditional) pass."""
    return getattr(unet, "time_cond_proj_dim", None) is not None


def guidance_condition(unet, guidance, batch):
    """The `timestep_cond` [batch, time_cond_proj_dim] of a guidance-distilled UNet, None for
    others. As diffusers' LatentConsistencyModelPipeline: w = guidance - 1 (its pipelines' scale s
    is Imagen's uncond + s (cond - uncond), LCM was distilled with cond + w (cond - uncond)),
    embedded by `guidance_scale_embedding` (of 1000 w)."""
    if not guidance_embedded(unet):
        return None
    w = ops.ones((batch,), "float32") * (ops.cast(guidance, "float32") - 1.0)
    return guidance_scale_embedding(w, unet.time_cond_proj_dim)


def guide(uncond, cond, guidance):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + s * (cond - uncond)."""
    return uncond + guidance * (cond - uncond)


def rescale_guidance(guided, cond, rescale):
    """diffusers' `rescale_noise_cfg` (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", eq. 15-16): the guided output rescaled to the conditional one's
    standard deviation (per image), mixed with itself by `rescale`."""
    axes = tuple(range(1, len(guided.shape)))
    std_cond = ops.std(cond, axis=axes, keepdims=True)
    std_guided = ops.std(guided, axis=axes, keepdims=True)
    # torch.std is the unbiased estimate: the ratio of two is the same either way
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1.0 - rescale) * guided


def model_output(unet, plan, latents, i, context):
    """The guided UNet output at step index `i`, float32: the conditional and unconditional
    passes run as one batch."""
    scheduler, tables, extra = plan.scheduler, plan.tables, plan.cond.get("extra")
    t = scheduler.model_timestep(i, tables)  # float32; fractional with Karras sigmas
    x = ops.concatenate([latents, latents], axis=0) if plan.use_guidance else latents
    x = scheduler.scale_model_input_at(x, i, tables)
    if extra is not None:
        extra = ops.concatenate([extra, extra], axis=0) if plan.use_guidance else extra
        x = ops.concatenate([x, extra], axis=-1)
    kwargs = {}
    if plan.timestep_cond is not None:
        cond = plan.timestep_cond
        kwargs["timestep_cond"] = ops.concatenate([cond, cond], axis=0) if plan.use_guidance else cond
    out = unet(x, t, context, **kwargs) if plan.added is None else unet(x, t, context, plan.added, **kwargs)
    out = ops.cast(out, "float32")
    if not plan.use_guidance:
        return out
    uncond, cond = ops.split(out, 2, axis=0)
    guided = guide(uncond, cond, plan.guidance)
    if plan.guidance_rescale is not None:
        guided = rescale_guidance(guided, cond, plan.guidance_rescale)
    return guided


def step_noise(plan, latents, i):
    """Fresh standard-normal noise x temperature for a stochastic sampler's step `i` (None for
    deterministic ones): one stream per (seed, step), so a run is repeatable."""
    if not plan.scheduler.stochastic:
        return None
    seed = tf.stack([tf.cast(plan.seed, "int64"), tf.cast(i, "int64") + 1])
    return tf.random.stateless_normal(tf.shape(latents), seed=seed) * plan.temperature


def _keep_known(plan, latents, i):
    """Inpainting with a 4-channel UNet: outside the mask, the image latents noised to the
    next index (un-noised after the last step), as diffusers."""
    cond = plan.cond
    steps = plan.num_indices
    nxt = ops.minimum(i + 1, steps - 1)
    noised = add_noise_at(plan.scheduler, cond["image_latents"], cond["noise"], nxt, plan.tables)
    known = ops.where(i + 1 < steps, noised, cond["image_latents"])
    return (1.0 - cond["mask"]) * known + cond["mask"] * latents


def denoise_step(unet, plan, latents, state, i, context):
    """One step at index `i`: x_i -> (x_{i+1}, the scheduler's new state, the guided output)."""
    out = model_output(unet, plan, latents, i, context)
    noise = step_noise(plan, latents, i)
    latents, state = plan.scheduler.step_fn(out, i, latents, state, noise=noise, tables=plan.tables)
    if "mask" in plan.cond:
        latents = _keep_known(plan, latents, i)
    return latents, state, out


def denoise(unet, plan, latents, context, start=0, end=None):
    """Every step from index `start` (0, or part-way for image-to-image) to index `end`
    (default: the last; earlier for SDXL's `denoising_end`), as one `ops.fori_loop` carrying
    (latents, scheduler state); returns the final latents."""

    def body(i, carry):
        x, state = carry
        x, state, _ = denoise_step(unet, plan, x, state, i, context)
        return x, state

    state = plan.scheduler.init_state(latents)
    latents, _ = ops.fori_loop(start, plan.num_indices if end is None else end, body, (latents, state))
    return latents
