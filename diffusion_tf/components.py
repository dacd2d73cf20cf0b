"""Building the networks of a model folder and loading their weights."""

import os

from diffusion_tf import runtime
from diffusion_tf.clip_tokenizer import CLIPTokenizer
from diffusion_tf.model_folder import components, read_config, read_vae_config, weights_path
from diffusion_tf.models import AutoencoderKL, AutoencoderTiny, CLIPTextModel, UNet2DConditionModel
from diffusion_tf.state_dict import load_weights

BUILDERS = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModel,  # with its projection (SDXL's OpenCLIP bigG)
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
}
_BUILD_ARGS = {"text_encoder_2": {"with_projection": True}}
# A "vae" section names its class when it is not the AutoencoderKL (diffusers' "_class_name").
VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def vae_class(config):
    """The VAE class of a "vae" config section (AutoencoderKL when it names none)."""
    name = config.get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"vae config: _class_name={name!r} is not supported; allowed: {', '.join(VAE_CLASSES)}.")
    return VAE_CLASSES[name]


def folder_section(component, model):
    """The config section a model folder stores for `model` (what `build_model` rebuilds it from)."""
    section = {k: v for k, v in model.get_config().items() if k not in ("name", "trainable", "dtype")}
    if component == "vae" and not isinstance(model, AutoencoderKL):
        section = {"_class_name": type(model).__name__, **section}
    return section


def build_model(component, config, dtype=None, **overrides):
    """An unweighted model of `component` with all variables created. It changes no process
    state (the converter builds networks it never calls): code that then runs the network
    calls `runtime.apply()` once its weights are in place, as `load_folder` does."""
    kwargs = dict(overrides, name=component)
    if dtype is not None:
        kwargs["dtype"] = dtype
    cls = vae_class(config) if component == "vae" else BUILDERS[component]
    model = cls.from_config(config, **_BUILD_ARGS.get(component, {}), **kwargs)
    model.build_weights()
    return model


def load_tokenizer(folder, config, section="tokenizer"):
    """The CLIPTokenizer of a model folder, from its config's "tokenizer" (or "tokenizer_2") settings.

    Keys: "context_length" (77), "pad_token_id" (49407) and "pad_token_in_prompt": "special" (the default:
    the pad token's text in a prompt becomes the pad id, as in transformers/diffusers) or "text" (ordinary
    BPE, as open_clip); see CLIPTokenizer.
    """
    tok = config.get(section, {})
    kwargs = {
        "context_length": tok.get("context_length", 77),
        "pad_token_id": tok.get("pad_token_id", 49407),
        "pad_token_in_prompt": tok.get("pad_token_in_prompt", "special"),
    }
    allowed = CLIPTokenizer.PAD_TOKEN_IN_PROMPT
    if kwargs["pad_token_in_prompt"] not in allowed:  # checked here: the files' error handling below would hide it
        raise ValueError(
            f"config.json of {folder!r}: {section}.pad_token_in_prompt must be one of "
            f"{', '.join(map(repr, allowed))}, got {kwargs['pad_token_in_prompt']!r}."
        )
    files = os.path.join(folder, section)
    if not os.path.isfile(os.path.join(files, "vocab.json")):
        return CLIPTokenizer(**kwargs)
    try:
        return CLIPTokenizer(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"the tokenizer files in {files!r} (vocab.json, merges.txt) are missing or corrupt: "
            f"{type(e).__name__}: {e}"
        ) from None


def load_folder(folder, attention=None, dtype=None):
    """{"config", "tokenizer", "text_encoder", "unet", "vae"} of a model folder, ready for use
    (SDXL: also "tokenizer_2" and "text_encoder_2"; the refiner has only those two of them).

    `attention`: "standard" or "linear" for the UNet's self-attention; None keeps the
    folder's own (its unet config's "attention", standard when absent). The runtime's heap
    setting is applied after the weights are loaded (`runtime.apply()`), so that the blocks
    freed while loading are not kept resident.
    """
    config = read_config(folder)
    out = {"config": config}
    for section in ("tokenizer", "tokenizer_2"):
        if section in config:
            out[section] = load_tokenizer(folder, config, section)
    for component in components(config):
        overrides = {"attention": attention} if component == "unet" and attention is not None else {}
        model = build_model(component, config[component], dtype, **overrides)
        load_weights(model, weights_path(folder, component))
        out[component] = model
    runtime.apply()
    return out


def load_vae_folder(folder, dtype=None):
    """(vae section, the VAE with its weights) of a VAE folder or of a model folder (its own VAE)."""
    section, _ = read_vae_config(folder)
    model = build_model("vae", section, dtype)
    load_weights(model, weights_path(folder, "vae"))
    return section, model
