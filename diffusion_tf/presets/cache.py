"""Where models live on disk: the weights cache of converted presets, and the built-in model.

    <cache>/downloads/<checkpoint filename>   the verified original checkpoint
    <cache>/models/<preset>/                   the converted model folder

`<cache>` is the runtime's home option (`$DIFFUSION_TF_HOME`), else `~/.cache/diffusion_tf`.
"""

import os

from diffusion_tf import runtime
from diffusion_tf.presets import registry

# The files that make a model folder complete (see diffusion_tf/model_folder.py).
_MODEL_FILES = ("config.json", "unet.weights.h5", "vae.weights.h5")
_BUILTIN_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shapes_model")


def _complete(folder):
    """config.json, the UNet and VAE and at least one text encoder (the SDXL refiner has only
    text_encoder_2)."""
    has = lambda f: os.path.isfile(os.path.join(folder, f))  # noqa: E731
    return all(has(f) for f in _MODEL_FILES) and (has("text_encoder.weights.h5") or has("text_encoder_2.weights.h5"))


def builtin_folder():
    """The model folder of the built-in "shapes" model (inside the installed package)."""
    return _BUILTIN_FOLDER


def builtin_available():
    """True iff the built-in model's folder holds its config.json and weight files."""
    return _complete(_BUILTIN_FOLDER)


def cache_dir():
    """The runtime's home option (`$DIFFUSION_TF_HOME`) if set, else `~/.cache/diffusion_tf`;
    created if missing."""
    root = runtime.home_dir()
    os.makedirs(root, exist_ok=True)
    return root


def preset_folder(name):
    """Where the converted model folder of preset `name` lives (whether or not it exists yet)."""
    registry.get_preset(name)  # validates the name
    return os.path.join(cache_dir(), "models", name)


def is_cached(name):
    """True iff the converted folder of `name` has its config.json and the three weight files."""
    return _complete(preset_folder(name))
