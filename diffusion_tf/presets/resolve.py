"""Model resolution: from what a user names (a folder, a preset, "shapes", nothing) to a
model folder on disk, downloading and converting a preset's checkpoint the first time only.

This sits above the converter: it looks the preset up in the registry and passes its configs
to `weights_port.convert_checkpoint`; weights_port never sees a preset name.
"""

import os

import weights_port
from diffusion_tf.presets import cache, registry
from diffusion_tf.presets.download import PresetUnavailableError, fetch, unavailable

__all__ = ["PresetUnavailableError", "default_model", "ensure_preset", "model_label", "resolve_model"]


def default_model():
    """(model, one-line message): the cached Stable Diffusion v1.5 folder, else the built-in
    model's folder, else (no built-in weights installed) the preset name "sd-v1-5", which
    Text2Image downloads and converts on first use.
    """
    preset, builtin = registry.DEFAULT_PRESET, registry.BUILTIN_MODEL
    if cache.is_cached(preset):
        folder = cache.preset_folder(preset)
        return folder, f"diffusion_tf: model {preset} (Stable Diffusion v1.5, cached in {folder})"
    if not cache.builtin_available():
        # A checkout without the built-in weights: Stable Diffusion v1.5, downloaded on first use.
        return preset, (
            f"diffusion_tf: model {preset} (not cached: it is downloaded and converted once, about 4 GB; "
            f"this installation has no built-in {builtin} model)"
        )
    return cache.builtin_folder(), (
        f"diffusion_tf: model {builtin} (built in: 64x64 captioned shapes, e.g. \"a red circle on a blue "
        f"background\"); for Stable Diffusion v1.5 pass --model {preset} (model=\"{preset}\"), "
        "which downloads and converts it once (about 4 GB)"
    )


def ensure_preset(name, download=True):
    """The converted model folder of preset `name`, downloading and converting it if missing.

    The checkpoint is fetched only when its sha256 is pinned in the preset and is
    verified before use; a file that fails verification is deleted. Any failure
    to obtain it (offline, DNS, HTTP error, hash mismatch, no pinned hash), or
    `download=False` while the folder is missing, raises PresetUnavailableError
    saying how to install the weights by hand.
    """
    preset = registry.get_preset(name)
    folder = cache.preset_folder(name)
    if cache.is_cached(name):
        return folder
    ckpt = preset["checkpoint"]
    if not download:
        raise PresetUnavailableError(
            unavailable(name, folder, ckpt, "download=False, so the checkpoint was not downloaded")
        )
    if not ckpt.get("sha256"):
        raise PresetUnavailableError(
            unavailable(
                name, folder, ckpt,
                f"the checkpoint at {ckpt['url']} has no pinned sha256 in this preset, "
                "and an unverified file is never downloaded",
            )
        )
    src = fetch(name, folder, ckpt)
    weights_port.convert_checkpoint(src, folder, config=preset["configs"], config_name=name, overwrite=True)
    if not cache.is_cached(name):
        raise ValueError(
            f"converting {src!r} for preset {name!r} did not produce a complete model folder at {folder!r}."
        )
    return folder


def resolve_model(model, download=True, log=None):
    """A model folder path from a folder, a preset name, "shapes" (the built-in model) or
    None (the default: `default_model()`, whose one-line note goes to `log`)."""
    if model is None:
        model, note = default_model()
        if log is not None:
            log(note)
        if model == registry.DEFAULT_PRESET:
            return ensure_preset(model, download=download)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model={model!r}; must be a model folder, a preset name or None (the default).")
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if model == registry.BUILTIN_MODEL:
        if not cache.builtin_available():
            raise ValueError(
                f"model={model!r}: the built-in shapes model's weights are not installed in "
                f"{cache.builtin_folder()!r}; train one with `python -m diffusion_tf.train` and pass its folder."
            )
        return cache.builtin_folder()
    if model in registry.list_presets():
        return ensure_preset(model, download=download)
    raise ValueError(
        f"model={model!r} is neither a model folder nor a preset; presets: "
        f"{', '.join([registry.BUILTIN_MODEL] + registry.list_presets())} (or convert a checkpoint with "
        "`python -m weights_port SRC DST` and pass model=DST)."
    )


def model_label(requested, folder):
    """The model as the user named it, for the PNG parameters and the page: the name given
    (a preset, "shapes", a folder as typed), else (the default model) "shapes" for the
    built-in model or the preset whose cache folder it is, else the folder."""
    if requested:
        return os.fspath(requested)
    here = os.path.normpath(os.path.abspath(folder))
    if here == os.path.normpath(os.path.abspath(cache.builtin_folder())):
        return registry.BUILTIN_MODEL
    for name in registry.list_presets():
        if here == os.path.normpath(os.path.abspath(cache.preset_folder(name))):
            return name
    return os.fspath(folder)
