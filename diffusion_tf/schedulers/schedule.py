"""The old import path of `diffusion_tf.schedulers.noise_schedule`."""

from diffusion_tf.schedulers.noise_schedule import *  # noqa: F401,F403
