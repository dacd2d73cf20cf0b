"""Named models ("presets") and the local cache of their converted weights.

A preset is data, one JSON file in this folder: the diffusers-style configs of
every component, where the official single-file checkpoint is published, and its
pinned sha256. `ensure_preset("sd-v1-5")` returns the converted model folder,
downloading and converting the checkpoint the first time only:

    <cache>/downloads/<checkpoint filename>   the verified original checkpoint
    <cache>/models/<preset>/                   the converted model folder

`<cache>` is `$DIFFUSION_TF_HOME`, else `~/.cache/diffusion_tf`. Files under
`<cache>/downloads` are not needed once the model folder exists.

One model ships inside the package and needs no download: "shapes", a small
text-to-image model trained from scratch on the captioned shapes
(`python -m diffusion_tf.train`). `default_model()` picks what `Text2Image()` and
`text2image.py` run without a model: Stable Diffusion v1.5 when its converted
folder is already cached, else "shapes".

Importing this module imports neither TensorFlow nor Keras.
"""

import copy
import functools
import json
import os

__all__ = [
    "BUILTIN_MODEL",
    "DEFAULT_PRESET",
    "PresetUnavailableError",
    "builtin_folder",
    "cache_dir",
    "default_model",
    "ensure_preset",
    "get_preset",
    "is_cached",
    "list_presets",
    "preset_folder",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
# The layout of a model folder (see diffusion_tf/model_folder.py).
_CONFIG_FILE = "config.json"
_WEIGHT_FILES = ("text_encoder.weights.h5", "unet.weights.h5", "vae.weights.h5")


# The model shipped in the package (package data), and the preset preferred when cached.
BUILTIN_MODEL = "shapes"
DEFAULT_PRESET = "sd-v1-5"
_BUILTIN_FOLDER = os.path.join(os.path.dirname(_HERE), "data", "shapes_model")


def builtin_folder():
    """The model folder of the built-in "shapes" model (inside the installed package)."""
    return _BUILTIN_FOLDER


def builtin_available():
    """True iff the built-in model's folder holds its config.json and weight files."""
    return all(os.path.isfile(os.path.join(_BUILTIN_FOLDER, f)) for f in (_CONFIG_FILE,) + _WEIGHT_FILES)


def default_model():
    """(model, one-line message): the cached Stable Diffusion v1.5 folder, else the built-in
    model's folder, else (no built-in weights installed) the preset name "sd-v1-5", which
    Text2Image downloads and converts on first use.
    """
    if is_cached(DEFAULT_PRESET):
        folder = preset_folder(DEFAULT_PRESET)
        return folder, f"diffusion_tf: model {DEFAULT_PRESET} (Stable Diffusion v1.5, cached in {folder})"
    if not builtin_available():
        # A checkout without the built-in weights: Stable Diffusion v1.5, downloaded on first use.
        return DEFAULT_PRESET, (
            f"diffusion_tf: model {DEFAULT_PRESET} (not cached: it is downloaded and converted once, about 4 GB; "
            f"this installation has no built-in {BUILTIN_MODEL} model)"
        )
    return _BUILTIN_FOLDER, (
        f"diffusion_tf: model {BUILTIN_MODEL} (built in: 64x64 captioned shapes, e.g. \"a red circle on a blue "
        f"background\"); for Stable Diffusion v1.5 pass --model {DEFAULT_PRESET} (model=\"{DEFAULT_PRESET}\"), "
        "which downloads and converts it once (about 4 GB)"
    )


class PresetUnavailableError(ValueError):
    """A preset's weights are not on disk and could not (or may not) be downloaded."""


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


def cache_dir():
    """`$DIFFUSION_TF_HOME` if set, else `~/.cache/diffusion_tf`; created if missing."""
    root = os.environ.get("DIFFUSION_TF_HOME") or os.path.join("~", ".cache", "diffusion_tf")
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    return root


def preset_folder(name):
    """Where the converted model folder of preset `name` lives (whether or not it exists yet)."""
    get_preset(name)  # validates the name
    return os.path.join(cache_dir(), "models", name)


def is_cached(name):
    """True iff the converted folder of `name` has its config.json and the three weight files."""
    folder = preset_folder(name)
    return all(os.path.isfile(os.path.join(folder, f)) for f in (_CONFIG_FILE,) + _WEIGHT_FILES)


def ensure_preset(name, download=True):
    """The converted model folder of preset `name`, downloading and converting it if missing.

    The checkpoint is fetched only when its sha256 is pinned in the preset and is
    verified before use; a file that fails verification is deleted. Any failure
    to obtain it (offline, DNS, HTTP error, hash mismatch, no pinned hash), or
    `download=False` while the folder is missing, raises PresetUnavailableError
    saying how to install the weights by hand.
    """
    preset = get_preset(name)
    folder = preset_folder(name)
    if is_cached(name):
        return folder
    ckpt = preset["checkpoint"]
    if not download:
        raise PresetUnavailableError(
            _unavailable(name, folder, ckpt, "download=False, so the checkpoint was not downloaded")
        )
    if not ckpt.get("sha256"):
        raise PresetUnavailableError(
            _unavailable(
                name, folder, ckpt,
                f"the checkpoint at {ckpt['url']} has no pinned sha256 in this preset, "
                "and an unverified file is never downloaded",
            )
        )
    src = _download(name, folder, ckpt)

    from weights_port.convert import convert_checkpoint

    convert_checkpoint(src, folder, config=name, overwrite=True)
    if not is_cached(name):
        raise ValueError(
            f"converting {src!r} for preset {name!r} did not produce a complete model folder at {folder!r}."
        )
    return folder


def _download(name, folder, ckpt):
    """Fetch the checkpoint into <cache>/downloads, verified; its path."""
    url, filename, sha256 = ckpt["url"], ckpt["filename"], ckpt["sha256"]
    cache = cache_dir()
    target = os.path.join(cache, "downloads", filename)
    if not os.access(cache, os.W_OK):
        raise PresetUnavailableError(
            _unavailable(name, folder, ckpt, f"the cache folder {cache!r} is not writable (set DIFFUSION_TF_HOME)")
        )
    import keras

    try:
        return keras.utils.get_file(
            filename,
            origin=url,
            file_hash=sha256,
            hash_algorithm="sha256",
            cache_dir=cache,
            cache_subdir="downloads",
        )
    except Exception as e:
        # get_file removes an interrupted download itself, but keeps a complete
        # file whose hash does not match: remove it. (A file left by an interrupt
        # during verification is verified again before any use.)
        if os.path.exists(target):
            os.remove(target)
        reason = str(e) if type(e) is Exception else f"{type(e).__name__}: {e}"
        reason = " ".join(reason.split()).rstrip(".") or type(e).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise PresetUnavailableError(
            _unavailable(name, folder, ckpt, f"downloading the checkpoint from {url} failed ({reason})")
        ) from e


def _unavailable(name, folder, ckpt, why):
    sha = ckpt.get("sha256")
    check = f" (sha256 {sha})" if sha else ""
    return (
        f"preset {name!r}: the converted weights are not on disk at {folder}, and {why}. "
        f"To install them by hand, download {ckpt['filename']}{check} from {ckpt['url']} "
        f"on a machine that can reach it, then run:\n"
        f"    python -m weights_port <downloaded file> {folder} --config {name}\n"
        f"(or convert it into any folder and pass model=<that folder>)."
    )
