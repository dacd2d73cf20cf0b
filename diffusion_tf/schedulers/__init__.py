"""Sampling algorithms behind one interface; `get(name, **config)` returns one by name."""

from diffusion_tf.schedulers.ddim import DDIMScheduler
from diffusion_tf.schedulers.scheduler import Scheduler

SCHEDULERS = {cls.name: cls for cls in (DDIMScheduler,)}


def get(name, **config):
    """A scheduler by name (e.g. "ddim"), built with diffusers-style config fields."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; allowed: {', '.join(sorted(SCHEDULERS))}.")
    return SCHEDULERS[name].from_config(config)
