"""VAE presets: stand-alone VAEs by name ("taesd", "taesdxl"), one JSON file each in presets/vae/.

A VAE preset holds the diffusers config of the VAE ("config", with its "_class_name"), where its
weights file is published ("weights": url pinned to a commit, filename, sha256, size_bytes), and
the model families it decodes for ("for": "sd" for SD 1.x/2.x, "sdxl"). They are not model
presets (`list_presets` never lists them, `model=` never takes them): only `vae=` / `--vae` do.

    <cache>/downloads/<weights filename>   the verified file
    <cache>/vaes/<name>/                    its VAE folder (weights_port.vae.convert_vae)

Reading a preset runs no code and imports neither TensorFlow nor Keras.
"""

import copy
import os

from diffusion_tf.presets import cache, registry
from diffusion_tf.presets.download import PresetUnavailableError, fetch, unavailable

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae")
FAMILIES = ("sd", "sdxl")


def list_vae_presets():
    """Names of the VAE presets, sorted."""
    return sorted(_names())


def _names():
    return registry.json_names(_HERE)


def _load(name):
    return registry.read_json_preset(_HERE, name, "VAE preset")


def get_vae_preset(name):
    """The VAE preset `name` (a fresh copy); ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _names():
        raise ValueError(f"unknown VAE preset {name!r}; VAE presets: {', '.join(list_vae_presets())}.")
    return copy.deepcopy(_load(name))


def vae_preset_folder(name):
    """Where the converted VAE folder of preset `name` lives (whether or not it exists yet)."""
    get_vae_preset(name)
    return os.path.join(cache.cache_dir(), "vaes", name)


def is_vae_cached(name):
    folder = vae_preset_folder(name)
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "vae.weights.h5"))


def ensure_vae_preset(name, download=True):
    """The VAE folder of preset `name`, downloading (verified by its pinned sha256) and converting
    its weights file the first time; PresetUnavailableError saying how to install it by hand when
    it cannot be (or, `download=False`, may not be) fetched."""
    import weights_port.vae

    preset = get_vae_preset(name)
    folder = vae_preset_folder(name)
    if is_vae_cached(name):
        return folder
    weights = preset["weights"]
    command = f"python -m weights_port --vae {{file}} {folder}"
    if not download or not weights.get("sha256"):
        why = ("download=False, so the weights were not downloaded" if not download else
               f"the file at {weights['url']} has no pinned sha256 in this preset, and an unverified file is never "
               "downloaded")
        raise PresetUnavailableError(unavailable(name, folder, weights, why, command, "vae"))
    src = fetch(name, folder, weights, command, "vae")
    weights_port.vae.convert_vae(src, folder, config=preset["config"], overwrite=True,
                                 note={"preset": name, "for": preset["for"]})
    return folder


def resolve_vae(vae, download=True):
    """A path from what `vae=` names: an existing folder or file as given, else a VAE preset's
    folder (downloaded and converted once); ValueError naming the value otherwise."""
    if not isinstance(vae, (str, os.PathLike)):
        raise ValueError(f"vae={vae!r}; must be a VAE folder or file, a model folder or a VAE preset "
                         f"({', '.join(list_vae_presets())}).")
    vae = os.fspath(vae)
    if os.path.exists(vae):
        return vae
    if vae in _names():
        return ensure_vae_preset(vae, download=download)
    raise ValueError(
        f"vae={vae!r} is neither a folder, a file nor a VAE preset; VAE presets: {', '.join(list_vae_presets())} "
        "(or a VAE folder from `python -m weights_port --vae SRC DST`, a TAESD or AutoencoderKL file or diffusers "
        "folder, or a model folder)."
    )
