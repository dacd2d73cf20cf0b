"""Another VAE for a pipeline (`Text2Image(vae=...)`, `load_vae`, text2image.py --vae).

What `vae=` takes: a VAE folder (`python -m weights_port --vae SRC DST`), a model folder (its own
VAE), a VAE preset ("taesd", "taesdxl"), or a source weights_port.vae reads in memory: a TAESD
(diffusers AutoencoderTiny folder or file, madebyollin's taesd_encoder/taesd_decoder files) or an
AutoencoderKL (diffusers folder, or one file in the original or diffusers layout).

The rules, checked before anything changes (ValueError naming the value and what is allowed):
  * the latents: the VAE's latent channels and downsampling factor are the model's own VAE's
    (a TAESD3/TAEF1, 16 channels, cannot decode SD latents);
  * the scale: the pipeline decodes `latents / vae.scaling_factor`, as diffusers. An AutoencoderKL
    must carry the model's scaling factor (SDXL's VAE, 0.13025, scales SD 1.x's latents wrongly);
    a file records none, so it takes the model's. A TAESD works on the sampler's latents as they
    are: its scaling factor must be 1.0 (diffusers' AutoencoderTiny config);
  * the family, where the VAE names it (a preset's "for": TAESD is for SD 1.x/2.x, TAESDXL for
    SDXL). Elsewhere the weights cannot tell them apart: both have 4 latent channels.
"""

import json
import math
import os

from diffusion_tf.components import load_vae_folder
from diffusion_tf.models import AutoencoderTiny
from diffusion_tf.presets.vae import resolve_vae

FAMILY_LABELS = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}


def reference(vae):
    """What a swapped VAE must match: the model's own VAE's latent channels, downsampling factor
    and scaling factor (None when the model's own VAE is a TAESD: then the model's latent scale is
    unknown)."""
    return {"latent_channels": vae.latent_channels, "downsampling_factor": vae.downsampling_factor,
            "scaling_factor": None if isinstance(vae, AutoencoderTiny) else vae.scaling_factor}


def _diffusion_tf_folder(path):
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and str(data.get("format", "")).startswith("diffusion_tf."):
        return data
    return None


def check_fits(label, model, ref, family, meta=None):
    """ValueError naming `label` and the rule when `model` cannot replace the VAE described by `ref`
    in a model of `family` ("sd" or "sdxl"); `meta`: the VAE folder's config (its "for")."""
    kind = type(model).__name__
    if model.latent_channels != ref["latent_channels"]:
        raise ValueError(
            f"vae={label!r}: this {kind} has {model.latent_channels} latent channels; the model's latents have "
            f"{ref['latent_channels']} (allowed: a VAE of {ref['latent_channels']} latent channels; "
            f"{model.latent_channels}-channel VAEs are for other models, e.g. TAESD3/TAEF1 for SD3/FLUX)."
        )
    if model.downsampling_factor != ref["downsampling_factor"]:
        raise ValueError(
            f"vae={label!r}: this {kind} scales images down by {model.downsampling_factor}, the model's VAE by "
            f"{ref['downsampling_factor']} (allowed: {ref['downsampling_factor']})."
        )
    if isinstance(model, AutoencoderTiny):
        if model.scaling_factor != 1.0:
            raise ValueError(
                f"vae={label!r}: an AutoencoderTiny with scaling_factor={model.scaling_factor!r}; TAESD decodes the "
                "sampler's latents as they are (allowed: 1.0)."
            )
    elif model.scaling_factor is None:
        if ref["scaling_factor"] is None:
            raise ValueError(
                f"vae={label!r}: the file records no scaling factor and the model's own VAE (a TAESD) gives none; "
                "pass a diffusers AutoencoderKL folder (its config.json has scaling_factor)."
            )
    elif ref["scaling_factor"] is not None and not math.isclose(model.scaling_factor, ref["scaling_factor"],
                                                                rel_tol=1e-6):
        raise ValueError(
            f"vae={label!r}: its scaling_factor is {model.scaling_factor!r}, the model's {ref['scaling_factor']!r} "
            f"(allowed: {ref['scaling_factor']!r}): a VAE of another model family (SDXL's is 0.13025, SD 1.x/2.x's "
            "0.18215) decodes these latents wrongly."
        )
    wanted = (meta or {}).get("for")
    if wanted is not None and family not in wanted:
        names = ", ".join(FAMILY_LABELS.get(f, f) for f in wanted)
        raise ValueError(
            f"vae={label!r} is for {names} models; this is an {FAMILY_LABELS[family]} model (allowed here: a VAE "
            f"for {FAMILY_LABELS[family]}{', e.g. taesdxl' if family == 'sdxl' else ', e.g. taesd'})."
        )


def load_vae(vae, ref, family, dtype=None, download=True):
    """(VAE network with its weights, its "vae" config section, label) for what `vae=` names,
    checked against `ref` (`reference(model's own VAE)`) and `family`; ValueError otherwise."""
    label = os.fspath(vae) if isinstance(vae, (str, os.PathLike)) else vae
    path = resolve_vae(vae, download=download)
    meta = _diffusion_tf_folder(path)
    if meta is not None:
        section, model = load_vae_folder(path, dtype)
    else:
        from weights_port.vae import read_vae

        section, model, _ = read_vae(path, dtype=dtype)
    check_fits(label, model, ref, family, meta)
    if model.scaling_factor is None:  # a file: the model's own scale
        model.scaling_factor = ref["scaling_factor"]
    section = dict(section, scaling_factor=model.scaling_factor)
    return model, section, label
