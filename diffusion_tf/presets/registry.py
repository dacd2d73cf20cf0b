"""The preset registry: named models as data, one JSON file per preset in this folder.

A preset holds the diffusers-style configs of every component ("configs": text_encoder,
unet, vae, scheduler, tokenizer), where the official single-file checkpoint is published
("checkpoint": url, filename, pinned sha256, size_bytes), its license and default size.
Reading it runs no code and imports neither TensorFlow nor Keras.
"""

import copy
import functools
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# The model shipped in the package (package data), and the preset preferred when cached.
BUILTIN_MODEL = "shapes"
DEFAULT_PRESET = "sd-v1-5"


def list_presets():
    """Names of the built-in presets, sorted."""
    return sorted(_names())


@functools.lru_cache(maxsize=None)
def _names():
    return tuple(f[: -len(".json")] for f in os.listdir(_HERE) if f.endswith(".json"))


@functools.lru_cache(maxsize=None)
def _load(name):
    path = os.path.join(_HERE, f"{name}.json")
    with open(path, encoding="utf-8") as f:
        preset = json.load(f)
    if preset.get("name") != name:
        raise ValueError(f"preset file {path!r} names itself {preset.get('name')!r}, not {name!r}.")
    return preset


def get_preset(name):
    """The preset `name` as a dict (a fresh copy: changing it changes nothing here).

    ValueError naming the value and listing the valid names when there is no such preset.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"a preset name must be a string, got {name!r} ({type(name).__name__}); "
            f"valid presets: {', '.join(list_presets())}."
        )
    if name not in _names():
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}.")
    return copy.deepcopy(_load(name))
