"""Named models ("presets") and the local cache of their converted weights.

A preset is data, one JSON file in this folder: the diffusers-style configs of
every component, where the official single-file checkpoint is published, and its
pinned sha256. `ensure_preset("sd-v1-5")` returns the converted model folder,
downloading and converting the checkpoint the first time only:

    <cache>/downloads/<checkpoint filename>   the verified original checkpoint
    <cache>/models/<preset>/                   the converted model folder

`<cache>` is `$DIFFUSION_TF_HOME` (the runtime's home option, `diffusion_tf.runtime`), else
`~/.cache/diffusion_tf`. Files under `<cache>/downloads` are not needed once the model
folder exists.

One model ships inside the package and needs no download: "shapes", a small
text-to-image model trained from scratch on the captioned shapes
(`python -m diffusion_tf.train`). `default_model()` picks what `Text2Image()` and
`text2image.py` run without a model: Stable Diffusion v1.5 when its converted
folder is already cached, else "shapes".

One job per module, each importing only those before it:

    registry.py   the presets as data (list_presets, get_preset, DEFAULT_PRESET, BUILTIN_MODEL)
    cache.py      where models live on disk (cache_dir, preset_folder, is_cached, builtin_*)
    download.py   fetching a checkpoint verified by its pinned sha256
    resolve.py    ensure_preset (download, then convert once with weights_port),
                  default_model, and resolve_model (folder / preset / "shapes" / None)
    vae.py        the VAE presets (taesd, taesdxl: data in presets/vae/), ensure_vae_preset and
                  resolve_vae (what `vae=` names); they are not model presets

Importing this package imports neither TensorFlow nor Keras.
"""

from diffusion_tf.presets.cache import builtin_available, builtin_folder, cache_dir, is_cached, preset_folder
from diffusion_tf.presets.download import PresetUnavailableError
from diffusion_tf.presets.registry import BUILTIN_MODEL, DEFAULT_PRESET, get_preset, list_presets
from diffusion_tf.presets.resolve import default_model, ensure_preset, model_label, resolve_model

__all__ = [
    "BUILTIN_MODEL",
    "DEFAULT_PRESET",
    "PresetUnavailableError",
    "builtin_available",
    "builtin_folder",
    "cache_dir",
    "default_model",
    "ensure_preset",
    "get_preset",
    "is_cached",
    "list_presets",
    "model_label",
    "preset_folder",
    "resolve_model",
]
