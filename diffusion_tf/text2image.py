"""The old import path of `diffusion_tf.pipeline.text_to_image` (Text2Image)."""

from diffusion_tf.pipeline.text_to_image import *  # noqa: F401,F403
from diffusion_tf.pipeline.text_to_image import (  # noqa: F401
    DEFAULTS, MAX_PIXELS, MAX_SEED, MAX_STEPS, NonFiniteOutputError, Text2Image, check_size, resolve_model,
    to_uint8,
)
