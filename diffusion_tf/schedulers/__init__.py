"""Sampling algorithms behind one interface; `get(name, **config)` returns one by name.

Names (see `names.py`, which imports nothing heavy): "ddim", "ddpm", "pndm" (alias
"plms"), "euler", "euler_a" (alias "euler-ancestral"), "heun", "lms", "dpm++2m", "lcm", "tcd", and
"euler-karras", "heun-karras", "lms-karras", "dpm++2m-karras" (use_karras_sigmas=True).

The classes and `SCHEDULERS` (every accepted name -> class) are imported lazily, so
`diffusion_tf.schedulers.names` can be read without importing Keras.
"""

import importlib

from diffusion_tf.schedulers.names import ALIASES, BASE, KARRAS, NAMES, resolve

# canonical name -> (module, class)
_CLASSES = {
    "ddim": ("ddim", "DDIMScheduler"),
    "ddpm": ("ddpm", "DDPMScheduler"),
    "pndm": ("pndm", "PNDMScheduler"),
    "euler": ("euler", "EulerDiscreteScheduler"),
    "euler_a": ("euler_ancestral", "EulerAncestralDiscreteScheduler"),
    "heun": ("heun", "HeunDiscreteScheduler"),
    "lms": ("lms", "LMSDiscreteScheduler"),
    "dpm++2m": ("dpm_solver_multistep", "DPMSolverMultistepScheduler"),
    "lcm": ("lcm", "LCMScheduler"),
    "tcd": ("tcd", "TCDScheduler"),
}
_BY_CLASS = {cls: (module, name) for name, (module, cls) in _CLASSES.items()}

__all__ = [
    "ALIASES", "BASE", "KARRAS", "NAMES", "SCHEDULERS", "Scheduler", "get", "resolve",
] + sorted(_BY_CLASS)


def _class(canonical):
    module, cls = _CLASSES[canonical]
    return getattr(importlib.import_module(f"diffusion_tf.schedulers.{module}"), cls)


def get(name, **config):
    """A scheduler by name, built from diffusers-style config fields (the model folder's
    `config["scheduler"]`); unknown names raise a ValueError listing the valid ones."""
    canonical, overrides = resolve(name)
    config.update(overrides)
    return _class(canonical).from_config(config)


def __getattr__(attr):
    if attr == "SCHEDULERS":
        value = {n: _class(resolve(n)[0]) for n in NAMES}
    elif attr == "Scheduler":
        from diffusion_tf.schedulers.scheduler import Scheduler as value
    elif attr in _BY_CLASS:
        value = _class(_BY_CLASS[attr][1])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    globals()[attr] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
