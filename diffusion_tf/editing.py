"""The old import path of `diffusion_tf.pipeline.editing` (image-to-image, inpainting and
outpainting inputs)."""

from diffusion_tf.pipeline.editing import *  # noqa: F401,F403
from diffusion_tf.pipeline.editing import (  # noqa: F401
    OUTPAINT_SIDES, EditInput, add_noise_at, check_combination, check_outpaint, check_strength, extend_canvas,
    latent_mask, masked_image, paste_back, prepare, scheduler_order, start_index,
)
