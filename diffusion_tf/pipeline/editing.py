"""Image-to-image, inpainting and outpainting: the input checks and preparations of
`Text2Image.generate(..., init_image=, strength=, mask=, outpaint=)`.

The denoising itself is the one sampling loop (`diffusion_tf.pipeline.sampling`); this module
only prepares what the loop gets and finishes the output. The choices, as diffusers'
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline unless stated:

* Size: the image decides the output size (`img_height` / `img_width` of the pipeline are
  ignored); its right/bottom remainder is cropped to a multiple of 8 (`fit_to_multiple_of_8`,
  at most 7 pixels); the result (after an outpaint enlargement) must fit the pixel budget.
* Schedule: `init_timestep = min(int(num_steps * strength), num_steps)`,
  `t_start = max(num_steps - init_timestep, 0)`; the loop runs from index
  `t_start * order` (order 2 for Heun) with the scheduler state of a fresh start (as
  diffusers' `set_begin_index`: no multistep history).
* Image latents: the VAE posterior MEAN x scaling factor (diffusers samples the posterior).
* Start: image-to-image `add_noise(image_latents, noise, timesteps[start])` (also at
  strength 1, as diffusers); inpainting / outpainting at strength 1: pure noise x
  `init_noise_sigma` (as diffusers); strength 0 (no steps): the un-noised image latents,
  i.e. the output is the VAE round trip of the input.
* `latents=`: the standard-normal noise [B, h, w, 4] in place of the seeded noise, used the
  same way in every mode (diffusers' inpainting uses given latents as the start and ignores
  the image for strength < 1; we add them to the image latents as the seeded noise is).
* Mask: white = repaint, binarised at 50% grey; resized (nearest, with a warning) to the
  image when its size differs. Latent mask: nearest downsampling (`mask[::8, ::8]`, as
  torch's `interpolate`). 9-channel UNets get [latents, mask, masked-image latents] with
  masked image = image * (mask < 0.5); 4-channel UNets blend the known region after every
  step: `(1 - m) * add_noise(image_latents, noise, t_next) + m * latents` (the last step with
  the un-noised image latents). Image-to-image (and text-to-image) with a 9-channel UNet is
  inpainting with an all-white mask.
* Paste-back: outside the mask the output is the input's pixels, exactly (`paste_back=False`
  gives the raw decoded output that diffusers returns).
* Outpainting: the canvas grows by the margins; the new area is filled by replicating the
  edge pixels (what the VAE encoder sees there; the model repaints it), the mask is the new
  area, and it runs as inpainting at strength 1.0 (`strength` is ignored); the old area is
  kept exactly by the paste-back.
"""

import numpy as np

from diffusion_tf import image_io
from diffusion_tf.pipeline import request
from diffusion_tf.pipeline.request import OUTPAINT_SIDES, check_combination, check_outpaint  # noqa: F401

def check_strength(strength):
    return request.check("strength", strength)


def start_index(num_steps, strength, scheduler):
    """The first index into `scheduler.timesteps` that runs, as diffusers' `get_timesteps`."""
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    return t_start * scheduler_order(scheduler)


def scheduler_order(scheduler):
    """diffusers' `scheduler.order`: 2 for Heun (two model evaluations per step), else 1."""
    from diffusion_tf.schedulers.heun import HeunDiscreteScheduler

    return getattr(scheduler, "order", 2 if isinstance(scheduler, HeunDiscreteScheduler) else 1)


class EditInput:
    """The prepared input: `image` uint8 [H, W, 3] (cropped / enlarged), `mask` float32
    [H, W] in {0, 1} or None (image-to-image), `strength`, `outpaint` margins or None."""

    def __init__(self, image, mask, strength, outpaint):
        self.image, self.mask, self.strength, self.outpaint = image, mask, strength, outpaint

    @property
    def inpainting(self):
        return self.mask is not None


def prepare(init_image, strength, mask=None, outpaint=None):
    """The checked and prepared edit (an `EditInput`), or None without an image."""
    strength = check_strength(strength)
    check_combination(init_image, mask, outpaint)
    if init_image is None:
        return None
    margins = check_outpaint(outpaint) if outpaint is not None else None
    original = image_io.load_image(init_image, "init_image")
    image = image_io.fit_to_multiple_of_8(original)
    if mask is not None:
        # resized to the original image (warning) and cropped the same way
        mask = image_io.fit_to_multiple_of_8(image_io.load_mask(mask, size=original.shape[:2]))
    if margins is not None:
        image, mask = extend_canvas(image, margins)
        strength = 1.0
    return EditInput(image, mask, strength, margins)


def extend_canvas(image, margins):
    """(enlarged image with edge-replicated new area, mask = 1 on the new area)."""
    pad = ((margins["top"], margins["bottom"]), (margins["left"], margins["right"]))
    big = np.pad(image, pad + ((0, 0),), mode="edge")
    mask = np.pad(np.zeros(image.shape[:2], "float32"), pad, constant_values=1.0)
    return big, mask


def latent_mask(mask, factor):
    """Pixel mask [H, W] -> latent mask [h, w, 1]: nearest, as torch's interpolate (default mode)."""
    return np.ascontiguousarray(mask[::factor, ::factor, None]).astype("float32")


def masked_image(image, mask):
    """The image in [-1, 1] with the repaint region set to 0, as diffusers: image * (mask < 0.5)."""
    pixels = image.astype("float32") / 127.5 - 1.0
    if mask is None:
        return np.zeros_like(pixels)
    return pixels * (mask < 0.5)[..., None]


def paste_back(images, original, mask):
    """Outside the mask (0), the original pixels exactly; inside, the generated ones."""
    keep = (mask < 0.5)[None, ..., None]
    return np.where(keep, original[None], images).astype(np.uint8)


def add_noise_at(scheduler, original, noise, i, tables):
    """The forward process at step index `i` (a tensor), as diffusers' `add_noise` with its
    step / begin index: alpha_t x0 + sigma_t eps (DPM-Solver), x0 + sigma eps (Euler, Heun,
    LMS), sqrt(a) x0 + sqrt(1 - a) eps at timestep[i] (DDIM, DDPM, PNDM)."""
    from keras import ops

    from diffusion_tf.schedulers.dpm_solver_multistep import DPMSolverMultistepScheduler
    from diffusion_tf.schedulers.scheduler import SigmaScheduler

    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.table("alpha_t", i, tables) * original + scheduler.table("sigma_t", i, tables) * noise
    if isinstance(scheduler, SigmaScheduler):
        return original + noise * scheduler.table("sigma", i, tables)
    t = ops.cast(ops.round(scheduler.model_timestep(i, tables)), "int32")
    a = scheduler.alpha_bar(t)
    return a**0.5 * original + (1 - a) ** 0.5 * noise
