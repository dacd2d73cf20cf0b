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
def json_names(folder):
    """The names of a folder of presets: its `<name>.json` files (model presets here, VAE presets
    in `vae/`)."""
    return tuple(f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json"))


@functools.lru_cache(maxsize=None)
def read_json_preset(folder, name, what="preset"):
    """`<folder>/<name>.json`, which must name itself `name` (read once; callers copy it)."""
    path = os.path.join(folder, f"{name}.json")
    with open(path, encoding="utf-8") as f:
        preset = json.load(f)
    if preset.get("name") != name:
        raise ValueError(f"{what} file {path!r} names itself {preset.get('name')!r}, not {name!r}.")
    return preset


def _names():
    return json_names(_HERE)


def _load(name):
    return read_json_preset(_HERE, name)


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
