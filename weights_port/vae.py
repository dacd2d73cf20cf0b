"""Stand-alone VAEs: TAESD (AutoencoderTiny) and AutoencoderKL sources -> a VAE folder, or the
network itself in memory (`Text2Image(vae=...)`).

Sources (`read_vae_source` says which, from the files and their keys, never their names alone):

    TAESD, diffusers       a folder with config.json ("_class_name": "AutoencoderTiny") and
                           diffusion_pytorch_model.safetensors (madebyollin/taesd, /taesdxl), or
                           that weights file alone (the architecture read from its keys)
    TAESD, original        madebyollin's taesd_encoder.<ext> + taesd_decoder.<ext> (.safetensors,
                           .pth: read by the safe unpickler; taesdxl_* too): either file (the other
                           is found beside it) or the folder holding exactly one such pair
    AutoencoderKL, diffusers   a folder with config.json ("_class_name": "AutoencoderKL"), e.g.
                           sdxl-vae-fp16-fix, or a pipeline folder's vae/; its scaling_factor is kept
    AutoencoderKL, file    one file in the LDM layout (bare `encoder.*` / `decoder.*` as
                           vae-ft-mse-840000-ema-pruned, or under `first_stage_model.`) or with
                           diffusers' names; a file records no scaling factor: the folder stores
                           null, the pipeline uses the model's

Strict, as the model converter: the architecture is read (or given), built, and every weight
found with its exact shape; every tensor of the source is used, except a VAE training file's
loss network (`loss.*`) and EMA counters (`model_ema.decay`, `model_ema.num_updates`). A file
that is a whole Stable Diffusion checkpoint, a LoRA or anything else is refused by name.
"""

import json
import os
import re

from weights_port import taesd_keys, vae_keys
from weights_port.checkpoint import READERS, read_checkpoint
from weights_port.errors import CheckpointError
from weights_port.infer import infer_vae
from weights_port.key_table import Source, resolve

UNUSED = (r"^(first_stage_model\.)?loss\.", r"^model_ema\.(decay|num_updates)$", r"\.num_batches_tracked$")
KL_DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"
KL_LDM_PROBE = "encoder.down.0.block.0.conv1.weight"
CLASSES = ("AutoencoderKL", "AutoencoderTiny")
DEFAULT_SCALING = {"AutoencoderKL": 0.18215, "AutoencoderTiny": 1.0}
DTYPES = ("float32", "float16")


def _log(msg):
    print(msg, flush=True)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path!r} is not readable JSON: {e}") from None


def _is_weights_file(name):
    return os.path.splitext(name)[1].lower() in READERS


def _taesd_pair(path):
    """The other file of an original TAESD pair: `encoder` <-> `decoder` in the file name."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    for this, other in (("decoder", "encoder"), ("encoder", "decoder")):
        i = stem.rfind(this)
        if i >= 0:
            return os.path.join(folder, stem[:i] + other + stem[i + len(this):] + ext)
    return None


def _pairs_in(folder):
    """{prefix: (encoder path, decoder path)} of the `<prefix>encoder.<ext>` / `<prefix>decoder.<ext>`
    pairs in `folder` (safetensors preferred to .pth where both exist)."""
    names = sorted(n for n in os.listdir(folder) if _is_weights_file(n))
    pairs = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if not stem.endswith("encoder"):
            continue
        partner = stem[: -len("encoder")] + "decoder" + ext
        if partner in names:
            prefix = stem[: -len("encoder")]
            if prefix not in pairs or ext == ".safetensors":
                pairs[prefix] = (os.path.join(folder, name), os.path.join(folder, partner))
    return pairs


def _component_weights(folder):
    from weights_port.convert import _component_weights as weights

    return weights(folder)


def _refuse_non_vae(path, keys):
    if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        raise CheckpointError(f"{path}: a LoRA file (lora_* keys), not a VAE.")
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for k in keys):
        raise CheckpointError(
            f"{path}: a whole Stable Diffusion checkpoint (UNet and text encoder keys), not a stand-alone VAE; "
            "pass a VAE file (AutoencoderKL or TAESD) or folder."
        )


def read_vae_source(src):
    """{"class": "AutoencoderKL" | "AutoencoderTiny", "layout": "diffusers" | "ldm" | "original",
    "tensors": {diffusers key or LDM key: array view}, "config": diffusers config or None,
    "prefix": LDM key prefix, "files": [paths]} of a VAE source; CheckpointError otherwise."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return _read_folder(src)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or folder.")
    tensors = read_checkpoint(src, mapped=True)
    keys = list(tensors)
    _refuse_non_vae(src, keys)
    if taesd_keys.is_original(keys):
        partner = _taesd_pair(src)
        if partner is None:
            raise CheckpointError(
                f"{src}: an original TAESD file (nn.Sequential entries) whose name has neither 'encoder' nor "
                "'decoder', so its other half cannot be found; pass the folder holding taesd_encoder.* and "
                "taesd_decoder.*."
            )
        decoder_first = taesd_keys.is_original_decoder(keys)
        enc, dec = (partner, src) if decoder_first else (src, partner)
        return _read_taesd_pair(enc, dec)
    if any(k.startswith((taesd_keys.ENCODER, taesd_keys.DECODER)) for k in keys):
        return {"class": "AutoencoderTiny", "layout": "diffusers", "tensors": tensors, "config": None, "files": [src]}
    return _kl_file(src, tensors)


def _kl_file(src, tensors):
    keys = list(tensors)
    if KL_DIFFUSERS_PROBE in tensors:
        return {"class": "AutoencoderKL", "layout": "diffusers", "tensors": tensors, "config": None, "files": [src]}
    for prefix in ("", vae_keys.PREFIX):
        if prefix + KL_LDM_PROBE in tensors:
            return {"class": "AutoencoderKL", "layout": "ldm", "prefix": prefix, "tensors": tensors, "config": None,
                    "files": [src]}
    raise CheckpointError(
        f"{src}: not a VAE: none of the layouts of an AutoencoderKL ({KL_LDM_PROBE}, {vae_keys.PREFIX}{KL_LDM_PROBE} "
        f"or {KL_DIFFUSERS_PROBE}) or of TAESD (encoder.layers.*, or taesd_encoder/decoder's '0.weight', "
        f"'1.conv.0.weight', ...) is there (first keys: {sorted(keys)[:4]})."
    )


def _read_taesd_pair(enc_path, dec_path):
    for path in (enc_path, dec_path):
        if not os.path.isfile(path):
            raise CheckpointError(
                f"the original TAESD files come in pairs, and {path} (the "
                f"{'encoder' if path == enc_path else 'decoder'}) is missing; both are needed "
                "(the encoder for image-to-image and inpainting, the decoder for every image)."
            )
    encoder, decoder = read_checkpoint(enc_path, mapped=True), read_checkpoint(dec_path, mapped=True)
    for path, part, want_decoder in ((enc_path, encoder, False), (dec_path, decoder, True)):
        if not taesd_keys.is_original(part):
            raise CheckpointError(f"{path}: not an original TAESD file (first keys: {sorted(part)[:4]}).")
        if taesd_keys.is_original_decoder(part) != want_decoder:
            raise CheckpointError(
                f"{path}: holds a TAESD {'decoder' if not want_decoder else 'encoder'} (its entry 0 "
                f"{'is missing' if not want_decoder else 'is a convolution'}), but its name says "
                f"{'encoder' if not want_decoder else 'decoder'}."
            )
    tensors = taesd_keys.from_original(encoder, decoder, (enc_path, dec_path))
    return {"class": "AutoencoderTiny", "layout": "original", "tensors": tensors, "config": None,
            "files": [enc_path, dec_path]}


def _read_folder(folder):
    for sub in ("", "vae"):
        path = os.path.join(folder, sub, "config.json")
        if not os.path.isfile(path):
            continue
        config = _read_json(path)
        if not isinstance(config, dict) or config.get("_class_name") not in CLASSES:
            if sub == "":
                if isinstance(config, dict) and str(config.get("format", "")).startswith("diffusion_tf."):
                    raise CheckpointError(f"{folder!r} is already a diffusion_tf folder ({config['format']}).")
                continue
            raise CheckpointError(
                f"{path!r}: _class_name={config.get('_class_name') if isinstance(config, dict) else None!r}; "
                f"a VAE folder's is one of {', '.join(CLASSES)}."
            )
        tensors = _component_weights(os.path.join(folder, sub))
        _refuse_non_vae(folder, list(tensors))
        return {"class": config["_class_name"], "layout": "diffusers", "tensors": tensors, "config": config,
                "files": [os.path.join(folder, sub)]}
    pairs = _pairs_in(folder)
    if len(pairs) == 1:
        return _read_taesd_pair(*next(iter(pairs.values())))
    if len(pairs) > 1:
        raise CheckpointError(
            f"{folder!r} holds {len(pairs)} TAESD pairs ({', '.join(p + 'encoder/decoder' for p in sorted(pairs))}); "
            "pass one of the files (e.g. its taesd_decoder.*) to choose."
        )
    raise CheckpointError(
        f"{folder!r} is not a VAE folder: no config.json of an AutoencoderKL or AutoencoderTiny (nor vae/config.json), "
        "and no taesd_encoder.* / taesd_decoder.* pair."
    )


# ---------------------------------------------------------------- building
def _shapes(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _diffusers_kl_config(shapes):
    """An AutoencoderKL config from diffusers-named keys."""
    def count(pattern):
        return len({m.group(1) for k in shapes for m in [re.match(pattern, k)] if m})

    levels = count(r"encoder\.down_blocks\.(\d+)\.")
    try:
        return {
            "in_channels": shapes["encoder.conv_in.weight"][1],
            "out_channels": shapes["decoder.conv_out.weight"][0],
            "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            "latent_channels": shapes["post_quant_conv.weight"][0],
            "norm_num_groups": 32,
            "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in shapes),
            "scaling_factor": None,
        }
    except KeyError as e:
        raise CheckpointError(f"cannot read the AutoencoderKL's architecture from its keys (missing {e}).") from None


def source_config(source):
    """The diffusers-style config of the VAE a source holds (given by its folder, else read from
    its keys); KL files get scaling_factor None (the files record none)."""
    if source["config"] is not None:
        return dict(source["config"])
    shapes = _shapes(source["tensors"])
    if source["class"] == "AutoencoderTiny":
        return dict(taesd_keys.infer_config(shapes), _class_name="AutoencoderTiny")
    if source["layout"] == "diffusers":
        return dict(_diffusers_kl_config(shapes), _class_name="AutoencoderKL")
    prefix = source["prefix"]
    try:
        config = infer_vae(shapes, prefix)
    except KeyError as e:
        raise CheckpointError(f"cannot read the AutoencoderKL's architecture from its keys (missing {e}).") from None
    config["mid_block_add_attention"] = any(k.startswith(prefix + "encoder.mid.attn_1.") for k in shapes)
    return dict(config, scaling_factor=None, _class_name="AutoencoderKL")


def _table(source, keys, config):
    if source["class"] == "AutoencoderTiny":
        return {k: Source((k,)) for k in keys}
    if source["layout"] == "diffusers":
        return vae_keys.diffusers_table(keys)
    strip = len(vae_keys.PREFIX)
    prefix = source["prefix"]
    return {k: Source(tuple(prefix + s[strip:] for s in src.keys))
            for k, src in vae_keys.table(keys, config).items()}


def read_vae(src, dtype=None, log=None, config=None):
    """(the folder's "vae" section, the VAE with its weights assigned, details) from a VAE source
    (see the module docstring); `details`: {"class", "layout", "files", "unused"}. Nothing is
    kept of the source (its tensors are memory-mapped views). `config`: the diffusers config of
    the VAE (with its "_class_name"), in place of the source's own or of one read from its keys
    (a preset's weights file)."""
    from diffusion_tf.components import build_model, folder_section
    from diffusion_tf.state_dict import named_variables, set_state_dict, state_dict_shapes

    from weights_port.convert import _AsFloat32

    log = log or (lambda *_: None)
    source = read_vae_source(src)
    if config is not None:
        if config.get("_class_name") != source["class"]:
            raise CheckpointError(f"{src} holds an {source['class']}, but the config given describes an "
                                  f"{config.get('_class_name')!r}.")
        source["config"] = dict(config)
    config = source_config(source)
    # diffusers' defaults where a folder's config has none; None: a file, which records none
    scaling = config.get("scaling_factor", DEFAULT_SCALING[source["class"]])
    log(f"building the {source['class']} ({source['layout']} layout)")
    try:
        model = build_model("vae", dict(config, scaling_factor=scaling if scaling is not None else 1.0), dtype)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    model.scaling_factor = scaling
    keys = list(named_variables(model))
    table = _table(source, keys, config)
    tensors = source["tensors"]
    where = " + ".join(source["files"])
    state, used = resolve(table, tensors, state_dict_shapes(model), where)
    unused = sorted(set(tensors) - used)
    unexpected = [k for k in unused if not any(re.search(p, k) for p in UNUSED)]
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} tensors fit no weight of the {source['class']} read from it, e.g. "
            f"{unexpected[:10]} (a VAE of another architecture?)."
        )
    set_state_dict(model, _AsFloat32(state), where)
    section = folder_section("vae", model)
    log(f"assigned {len(state)} tensors; {len(unused)} entries unused")
    return section, model, {"class": source["class"], "layout": source["layout"], "files": source["files"],
                            "unused": unused}


def convert_vae(src, dst, dtype="float32", overwrite=False, log=_log, note=None, config=None):
    """Convert a VAE source into a VAE folder at `dst` (config.json + vae.weights.h5, see
    diffusion_tf.model_folder); `note`: extra config entries (a preset's name, the model families it
    decodes for); `config`: as for `read_vae`."""
    from diffusion_tf.model_folder import VAE_FORMAT, write_folder

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}.")
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"destination {dst!r} already exists; choose another or pass --overwrite.")
    log(f"reading {src}")
    section, model, details = read_vae(src, log=log, config=config)
    config = {"vae": section, "source": os.path.basename(os.path.abspath(os.fspath(src))),
              "source_layout": details["layout"], "weights_dtype": dtype,
              "unused_checkpoint_keys": details["unused"]}
    config.update(note or {})
    write_folder(dst, config, {"vae": model}, dtype=dtype, overwrite=overwrite, fmt=VAE_FORMAT)
    log(f"wrote {dst}")
    return dst
