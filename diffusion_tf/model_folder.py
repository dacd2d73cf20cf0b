"""The model folder: what weights_port writes and `Text2Image(model=FOLDER)` reads.

    FOLDER/config.json             {"format", "text_encoder", "unet", "vae", "scheduler",
                                    "tokenizer", "source", "weights_dtype"}
    FOLDER/text_encoder.weights.h5 state dicts keyed by diffusers names (see state_dict.py)
    FOLDER/unet.weights.h5
    FOLDER/vae.weights.h5
    FOLDER/tokenizer/              optional vocab.json + merges.txt (else the built-in CLIP BPE)

SDXL folders add "text_encoder_2" (with its text_encoder_2.weights.h5), "tokenizer_2" (and an
optional tokenizer_2/ folder) and "pipeline" ({"force_zeros_for_empty_prompt",
"requires_aesthetics_score"}, diffusers' model_index.json flags); the refiner has only the second
encoder (no "text_encoder" / "tokenizer"), as its diffusers folder.

A VAE folder holds one stand-alone VAE (`weights_port --vae`, `Text2Image(vae=FOLDER)`):

    FOLDER/config.json             {"format": "diffusion_tf.vae.v1", "vae", "source", "weights_dtype"}
    FOLDER/vae.weights.h5

Its "vae" section is a model folder's (AutoencoderKL's fields, or AutoencoderTiny's with
"_class_name": "AutoencoderTiny"); a "scaling_factor" of null means the file gave none: the VAE
takes the scaling factor of the model it decodes for.

A folder is written to a temporary sibling and renamed into place, so a failed or
interrupted write never leaves a partial folder at the destination.
"""

import functools
import json
import os
import shutil
import tempfile

FORMAT = "diffusion_tf.model.v1"
VAE_FORMAT = "diffusion_tf.vae.v1"
COMPONENTS = ("text_encoder", "unet", "vae")  # every folder of SD 1.x/2.x
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
PIPELINE_FLAGS = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": False}


def components(config):
    """The networks of a folder's config, in ALL_COMPONENTS order (unet, vae and one text encoder
    or two)."""
    return tuple(c for c in ALL_COMPONENTS if isinstance(config.get(c), dict))


def pipeline_flags(config):
    """The folder's pipeline flags, defaults filled in (SDXL's model_index.json values)."""
    flags = dict(PIPELINE_FLAGS)
    flags.update(config.get("pipeline") or {})
    return flags


def weights_path(folder, component):
    return os.path.join(folder, f"{component}.weights.h5")


def read_config(folder):
    """The folder's config.json, validated; ValueError naming the folder otherwise."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ValueError(f"model folder {folder!r} does not exist.")
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder!r} is not a diffusion_tf model folder (no config.json); "
            "convert a checkpoint with `python -m weights_port SRC DST`."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} config.")
    present = components(config)
    encoders = [c for c in present if c in TOKENIZERS]
    if not encoders:
        raise ValueError(f"{path!r} lacks the 'text_encoder' section.")
    required = ("unet", "vae", "scheduler") + tuple(TOKENIZERS[c] for c in encoders)
    for key in required:
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{path!r} lacks the {key!r} section.")
    pipeline = config.get("pipeline", {})
    if not isinstance(pipeline, dict) or set(pipeline) - set(PIPELINE_FLAGS) or not all(
            isinstance(v, bool) for v in pipeline.values()):
        raise ValueError(f"{path!r}: pipeline={pipeline!r}; must be an object of booleans among "
                         f"{sorted(PIPELINE_FLAGS)}.")
    for component in present:
        if not os.path.isfile(weights_path(folder, component)):
            raise ValueError(
                f"model folder {folder!r} is missing {component}.weights.h5 "
                "(an interrupted conversion? convert again)."
            )
    return config


def read_vae_config(folder):
    """(vae section, config.json) of a VAE folder, or of a model folder (its own VAE); ValueError
    naming the folder otherwise."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder!r} is not a diffusion_tf VAE or model folder ({path}: {e}).") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt == FORMAT:
        read_config(folder)  # the model folder's own checks
    elif fmt != VAE_FORMAT:
        raise ValueError(f"{path!r} is neither a {VAE_FORMAT} nor a {FORMAT} config.")
    if not isinstance(config.get("vae"), dict):
        raise ValueError(f"{path!r} lacks the 'vae' section.")
    if not os.path.isfile(weights_path(folder, "vae")):
        raise ValueError(f"{folder!r} is missing vae.weights.h5 (an interrupted conversion? convert again).")
    return config["vae"], config


def write_folder(dst, config, models, dtype=None, tokenizer_files=None, overwrite=False, progress=None,
                 fmt=FORMAT):
    """Write `config` and the `models` {component: keras model} to `dst` atomically.

    `tokenizer_files`: a folder with vocab.json and merges.txt to copy, or None; or a dict
    {"tokenizer": folder, "tokenizer_2": folder} (SDXL).
    `progress(component, done, total)`, if given, is called after each tensor is written.
    `fmt`: the config's "format" (VAE_FORMAT for a VAE folder).
    """
    from diffusion_tf.state_dict import save_weights

    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"destination {dst!r} already exists (pass overwrite=True to replace it).")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=parent)
    try:
        for component, model in models.items():
            step = None if progress is None else functools.partial(progress, component)
            save_weights(model, weights_path(tmp, component), dtype=dtype, progress=step)
        if tokenizer_files and not isinstance(tokenizer_files, dict):
            tokenizer_files = {"tokenizer": tokenizer_files}
        for sub, source in (tokenizer_files or {}).items():
            if not source:
                continue
            os.makedirs(os.path.join(tmp, sub))
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(os.path.join(source, name), os.path.join(tmp, sub, name))
        config = dict(config, format=fmt)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".old", dir=parent)
            os.replace(dst, os.path.join(old, "x"))
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
