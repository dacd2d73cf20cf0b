"""Converting a diffusers folder or an original single file into a diffusion_tf model folder.

Strict, in the manner of nanoGPT's `from_pretrained`: every weight of the models
we build is assigned, every shape is checked, and every checkpoint tensor is
either used or listed as unused; any failure names the key and leaves nothing
at the destination (the folder is built in a temporary sibling and renamed).
"""

import collections.abc
import functools
import glob
import json
import os
import re

import numpy as np

from weights_port import clip_keys, unet_keys, vae_keys
from weights_port.checkpoint import read_checkpoint
from weights_port.errors import CheckpointError
from weights_port.infer import SD_SCHEDULER, describe, infer_configs, sdxl_variant
from weights_port.key_table import resolve
from weights_port.safetensors_reader import read_safetensors_metadata

COMPONENTS = ("text_encoder", "unet", "vae")  # SD 1.x/2.x; SDXL: text_encoder_2 too, the refiner without text_encoder
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
PIPELINE_FLAGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
SCHEDULER_FIELDS = tuple(SD_SCHEDULER) + ("clip_sample", "trained_betas")
DTYPES = ("float32", "float16")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Entries of original single files that are not weights of the three networks.
UNUSED_ORIGINAL = (
    r"^model_ema\.", r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_.*|posterior_.*)$",
    r"^first_stage_model\.(loss|encoder\.mid\.attn_1\.\w+\.num_batches_tracked)", r"^cond_stage_model\..*position_ids$",
    r"^cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)$",
    r"^cond_stage_model\.model\.transformer\.resblocks\.\d+\.",  # layers past the penultimate (SD 2.x)
    r"^model\.diffusion_model\..*num_batches_tracked$",
    r"^cond_stage_model\.transformer\.(text_model\.)?(embeddings\.position_ids)$",
    # SDXL (SGM layout): buffers of the text towers and the denoiser's noise schedule. Unlike SD 2.x
    # every OpenCLIP layer is a weight here, so no resblock is allowed to go unused.
    r"^conditioner\.embedders\.\d+\.transformer\.(text_model\.)?embeddings\.position_ids$",
    r"^conditioner\.embedders\.\d+\.model\.(logit_scale|attn_mask)$",
    r"^denoiser\.(sigmas|log_sigmas)$",
)


def _log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------- sources
def _component_weights(folder):
    """Every tensor of one diffusers component folder (safetensors preferred, shards too)."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        index = sorted(glob.glob(os.path.join(folder, pattern)))
        if index:
            with open(index[0], encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(read_checkpoint(os.path.join(folder, shard), mapped=True))
            return out
    for name in (
        "diffusion_pytorch_model.safetensors", "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
        "diffusion_pytorch_model.bin", "pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin",
    ):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_checkpoint(path, mapped=True)
    raise CheckpointError(f"no weights file (*.safetensors or *.bin) in {folder!r}.")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path!r}.") from None
    except ValueError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from None


def folder_configs(folder):
    """Configs of a diffusers-style folder (unet/, vae/, text_encoder/ and/or text_encoder_2/,
    scheduler/, tokenizer/ and/or tokenizer_2/, model_index.json's SDXL pipeline flags)."""
    from diffusion_tf.clip_tokenizer import CLIPTokenizer

    configs = {c: _read_json(os.path.join(folder, c, "config.json")) for c in ("unet", "vae")}
    for c in TEXT_ENCODERS:
        path = os.path.join(folder, c, "config.json")
        if os.path.isfile(path):
            configs[c] = _read_json(path)
    if not any(c in configs for c in TEXT_ENCODERS):
        raise CheckpointError(f"missing {os.path.join(folder, 'text_encoder', 'config.json')!r} "
                              "(a model needs text_encoder/ or, as the SDXL refiner, text_encoder_2/).")
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    configs["scheduler"] = _read_json(scheduler) if os.path.isfile(scheduler) else dict(SD_SCHEDULER)
    for encoder, section in TOKENIZERS.items():
        if encoder not in configs:
            continue
        tokenizer = os.path.join(folder, section)
        if os.path.isdir(tokenizer):
            configs[section] = CLIPTokenizer.from_folder(tokenizer).get_config()
        else:
            configs[section] = dict(DEFAULT_TOKENIZER)
    index = os.path.join(folder, "model_index.json")
    if "text_encoder_2" in configs and os.path.isfile(index):
        flags = _read_json(index)
        configs["pipeline"] = {k: bool(flags[k]) for k in PIPELINE_FLAGS if k in flags}
    return configs


CONFIG_SECTIONS = ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler", "tokenizer", "tokenizer_2",
                   "pipeline", "defaults")
DEFAULT_TOKENIZER = {"pad_token_id": 49407, "context_length": 77}


def given_configs(config):
    """The configs that `config` describes, as fresh dicts: a diffusers-style folder
    (`folder_configs`) or a dict {"text_encoder", "unet", "vae"[, "scheduler", "tokenizer"]}
    of config dicts (a preset's "configs"; the scheduler and tokenizer default as for a
    folder). ValueError naming the value otherwise: preset names are looked up above this
    package (`python -m weights_port --config NAME`, `diffusion_tf.presets`)."""
    if isinstance(config, (str, os.PathLike)):
        if os.path.isdir(config):
            return folder_configs(config)
        raise ValueError(
            f"config={os.fspath(config)!r} is not a folder; pass a diffusers-style folder or a dict of "
            f"configs with keys {', '.join(CONFIG_SECTIONS)} (a preset's configs: "
            "diffusion_tf.presets.get_preset(NAME)['configs'], or `python -m weights_port SRC DST --config NAME`)."
        )
    if not isinstance(config, dict):
        raise ValueError(
            f"config={config!r} ({type(config).__name__}); must be a diffusers-style folder or a dict of configs "
            f"with keys {', '.join(CONFIG_SECTIONS)}."
        )
    missing = [k for k in ("unet", "vae") if k not in config]
    if not any(k in config for k in TEXT_ENCODERS):
        missing.append("text_encoder")
    unknown = sorted(set(config) - set(CONFIG_SECTIONS))
    bad = [k for k in CONFIG_SECTIONS if k in config and not isinstance(config[k], dict)]
    if missing or unknown or bad:
        raise ValueError(
            f"config has keys {sorted(config)}"
            + (f", lacking {', '.join(missing)}" if missing else "")
            + (f", with unknown {', '.join(unknown)}" if unknown else "")
            + (f", and {', '.join(bad)} not dicts" if bad else "")
            + f"; allowed keys: {', '.join(CONFIG_SECTIONS)} (unet, vae and text_encoder or text_encoder_2 "
            "required), each a dict."
        )
    out = {k: dict(v) for k, v in config.items()}
    out.setdefault("scheduler", dict(SD_SCHEDULER))
    for encoder, section in TOKENIZERS.items():
        if encoder in out:
            out.setdefault(section, dict(DEFAULT_TOKENIZER))
    return out


def components(configs):
    """The networks `configs` describe, in a fixed order."""
    return tuple(c for c in ("text_encoder", "text_encoder_2", "unet", "vae") if c in configs)


def _clean_scheduler(config, prediction_type):
    out = {k: config[k] for k in SCHEDULER_FIELDS if k in config and config[k] is not None}
    for key, value in SD_SCHEDULER.items():
        out.setdefault(key, value)
    if prediction_type is not None:
        out["prediction_type"] = prediction_type
    return out


def _config_label(config, config_name):
    """How messages name the architecture given: as the user spelled it on the command line."""
    if config_name is not None:
        return f"--config {config_name!r}"
    return f"--config {os.fspath(config)!r}" if isinstance(config, (str, os.PathLike)) else "the config dict"


def _family(configs):
    if "text_encoder_2" in configs:
        return "sdxl"
    te = configs["text_encoder"]
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def _kind(family, sdxl):
    """A model kind for messages: the family, SDXL split into base (the inpainting model too)
    and refiner."""
    return f"sdxl-{sdxl}" if family == "sdxl" else family


def _config_kind(configs):
    family = _family(configs)
    return _kind(family, "base" if "text_encoder" in configs else "refiner")


KIND_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl-base": "SDXL base", "sdxl-refiner": "SDXL refiner"}
KIND_ENCODERS = {
    "sd1": "CLIP ViT-L text encoder",
    "sd2": "OpenCLIP text encoder",
    "sdxl-base": "CLIP ViT-L and OpenCLIP bigG text encoders",
    "sdxl-refiner": "the OpenCLIP bigG text encoder alone",
}


# ---------------------------------------------------------------- conversion
def build_models(configs):
    """{component: unweighted network with all variables created} for `configs` (as from
    `given_configs`); networks built only to receive weights (no process state changes)."""
    from diffusion_tf.components import build_model

    return {c: build_model(c, configs[c]) for c in components(configs)}



def _tables(models, configs, single_file, family):
    from diffusion_tf.state_dict import named_variables

    keys = {c: list(named_variables(models[c])) for c in models}
    if not single_file:
        tables = {c: clip_keys.hf_table(keys[c]) for c in TEXT_ENCODERS if c in keys}
        tables.update(unet=unet_keys.diffusers_table(keys["unet"]), vae=vae_keys.diffusers_table(keys["vae"]))
        return tables
    tables = {"unet": unet_keys.table(keys["unet"], configs["unet"]), "vae": vae_keys.table(keys["vae"], configs["vae"])}
    if family == "sdxl":  # SGM: the base's two towers, the refiner's bigG alone (at embedders.0)
        if "text_encoder" in keys:
            tables["text_encoder"] = clip_keys.hf_table(keys["text_encoder"], clip_keys.SGM_HF_PREFIX)
            big_g = clip_keys.SGM_OPENCLIP_PREFIX
        else:
            big_g = clip_keys.SGM_REFINER_OPENCLIP_PREFIX
        tables["text_encoder_2"] = clip_keys.openclip_table(keys["text_encoder_2"], big_g)
        return tables
    text = (
        clip_keys.openclip_table(keys["text_encoder"])
        if family == "sd2"
        else clip_keys.hf_table(keys["text_encoder"], clip_keys.HF_PREFIX)
    )
    return dict(tables, text_encoder=text)


def original_tables(models, configs):
    """Key tables of a single-file checkpoint for `models` (used by tests to write one): the
    LDM layout of SD 1.x/2.x, Stability's SGM layout for SDXL."""
    return _tables(models, configs, True, _family(configs))


class _Progress:
    """Logs "<verb> <component>: done/total tensors (p%)" at each quarter of a component, so a
    long conversion shows it is moving without a line per tensor."""

    def __init__(self, log, verb):
        self.log, self.verb = log, verb

    def __call__(self, component, done, total):
        if done == total or (done * 4) // total != ((done - 1) * 4) // total:
            self.log(f"{self.verb} {component}: {done}/{total} tensors ({100 * done // total}%)")


class _AsFloat32(collections.abc.Mapping):
    """The resolved tensors as float32, each converted when it is read: the sources are memory-mapped
    views, so a conversion holds the networks plus one tensor (SDXL: 14 GB, not 24 or, from
    float16 files, 21)."""

    def __init__(self, state):
        self.state = state

    def __getitem__(self, key):
        return np.asarray(self.state[key]).astype(np.float32, copy=False)

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


def _assign(models, tables, sources, what, log=_log):
    from diffusion_tf.state_dict import set_state_dict, state_dict_shapes

    used = {}
    progress = _Progress(log, "assigning")
    for c in models:
        shapes = state_dict_shapes(models[c])  # not get_state_dict: that copies every weight (SDXL: +14 GB)
        state, used[c] = resolve(tables[c], sources[c], shapes, f"{what} ({c})")
        set_state_dict(models[c], _AsFloat32(state), f"{what} ({c})",
                       progress=functools.partial(progress, c))
    return used


def _refuse_vae_file(src, shapes):
    """A stand-alone VAE (no UNet) given as a whole model: say how to convert it."""
    if any(k.startswith(unet_keys.PREFIX) for k in shapes):
        return
    from weights_port import taesd_keys

    keys = list(shapes)
    taesd = taesd_keys.is_original(keys) or any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys)
    kl = any(k.startswith(("encoder.down", "first_stage_model.encoder.down")) for k in keys)
    if taesd or kl:
        raise CheckpointError(
            f"{src} is a stand-alone VAE ({'TAESD' if taesd else 'AutoencoderKL'}), not a whole model: convert it "
            "with `python -m weights_port --vae SRC DST`, or pass it to Text2Image(vae=...) / text2image.py --vae."
        )


def convert_checkpoint(src, dst, config=None, prediction_type=None, dtype="float32", overwrite=False, log=_log,
                       config_name=None):
    """Convert `src` (diffusers folder, .safetensors or .ckpt) into a model folder at `dst`.

    `config`: the architecture, a diffusers-style folder or a dict of configs (`given_configs`);
    None reads it from a diffusers `src` or infers it from a single file's key shapes.
    `config_name`: what messages call `config` (the CLI passes the preset name it looked up).
    """
    from diffusion_tf.model_folder import write_folder

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}.")
    if prediction_type not in (None,) + PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}.")
    src = os.fspath(src)
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"destination {dst!r} already exists; choose another or pass --overwrite.")
    single_file = not os.path.isdir(src)
    tokenizer_files = None
    if single_file:
        log(f"reading {src}")
        tensors = read_checkpoint(src, mapped=True)  # views of a memory map: not held in memory
        shapes = {k: v.shape for k, v in tensors.items()}
        _refuse_vae_file(src, shapes)
        family = describe(shapes)
        kind = _kind(family, sdxl_variant(shapes) if family == "sdxl" else None)
        configs = given_configs(config) if config is not None else infer_configs(shapes)
        if config is not None and _config_kind(configs) != kind:
            raise CheckpointError(
                f"{src} looks like an {KIND_LABELS[kind]} checkpoint ({KIND_ENCODERS[kind]}) but "
                f"{_config_label(config, config_name)} describes an {KIND_LABELS[_config_kind(configs)]} model "
                f"({KIND_ENCODERS[_config_kind(configs)]}); pass a config of the same kind, or none to infer it."
            )
        sources = {c: tensors for c in components(configs)}
    else:
        if not os.path.isfile(os.path.join(src, "unet", "config.json")):
            raise CheckpointError(
                f"{src!r} is a folder but not a diffusers model folder (no unet/config.json); a stand-alone VAE "
                "folder converts with `python -m weights_port --vae SRC DST`."
            )
        configs = given_configs(config) if config is not None else folder_configs(src)
        family = _family(configs)
        sources = {c: _component_weights(os.path.join(src, c)) for c in components(configs)}
        tokenizer_files = {section: os.path.join(src, section) for encoder, section in TOKENIZERS.items()
                           if encoder in configs and os.path.isfile(os.path.join(src, section, "vocab.json"))}
    configs["scheduler"] = _clean_scheduler(configs["scheduler"], prediction_type)

    log(f"building the {family.upper() + ('' if family == 'sdxl' else '.x')} architecture")
    models = build_models(configs)
    tables = _tables(models, configs, single_file, family)
    used = _assign(models, tables, sources, src, log)

    if single_file:
        unused = sorted(set(tensors) - set().union(*used.values()))
        unexpected = [k for k in unused if not any(re.match(p, k) for p in UNUSED_ORIGINAL)]
    else:
        unused = sorted(k for c in models for k in set(sources[c]) - used[c])
        unexpected = [k for k in unused if not k.endswith("position_ids")]
    total = sum(len(s) for s in used.values())
    log(f"assigned {total} tensors; {len(unused)} checkpoint entries unused")
    if unexpected:
        raise CheckpointError(
            f"{src}: {len(unexpected)} checkpoint tensors fit no weight of the configured "
            f"architecture, e.g. {unexpected[:10]} (wrong --config?)."
        )
    from diffusion_tf.components import folder_section

    folder_config = {name: folder_section(name, models[name]) for name in models}
    folder_config["unet"].pop("attention", None)
    folder_config.update({s: configs[s] for s in ("tokenizer", "tokenizer_2", "pipeline", "defaults") if s in configs})
    folder_config.update(
        scheduler=configs["scheduler"],
        source=os.path.basename(os.path.abspath(src)),
        weights_dtype=dtype,
        unused_checkpoint_keys=unused,
    )
    write_folder(dst, folder_config, models, dtype=dtype, tokenizer_files=tokenizer_files, overwrite=overwrite,
                 progress=_Progress(log, "writing"))
    log(f"wrote {dst}")
    return dst


def describe_file(path):
    """Shapes of a checkpoint's tensors without loading .safetensors data."""
    if path.endswith(".safetensors"):
        return {k: tuple(v["shape"]) for k, v in read_safetensors_metadata(path).items()}
    return {k: v.shape for k, v in read_checkpoint(path).items()}
