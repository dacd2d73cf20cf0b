"""The VAE fixtures as real files: TAESD (AutoencoderTiny) and a stand-alone AutoencoderKL.

The fixtures (tests/fixtures/vae/, written by scripts/make_vae_fixtures.py) hold configs and
reference outputs only; the weights are `random_weights` values drawn from each diffusers key
and shape, so the fixture script (with torch) and the tests (without) write the same files:

    diffusers folder   config.json + diffusion_pytorch_model.safetensors (diffusers names)
    original TAESD     taesd_encoder.<ext> / taesd_decoder.<ext>, madebyollin's nn.Sequential
                       numbering: the encoder's `layers.<i>` is `<i>`, the decoder's is `<i + 1>`
                       (its entry 0 is the parameterless tanh clamp)
    original VAE       an AutoencoderKL in the LDM layout (`encoder.down.0.block.0...`), bare as
                       vae-ft-mse-840000-ema-pruned.safetensors or under `first_stage_model.`;
                       the mid attention's q/k/v/proj_out stored as 1x1 convolutions as there

Only NumPy, safetensors and weights_port's key tables (no TensorFlow) are imported here.
"""

import json
import os
import re

import numpy as np

from support.random_weights import random_state_dict
from support.torch_format import module_state_dict, save_torch_zip

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "vae")
TAESD_NAMES = ("tiny-taesd", "tiny-taesd-silu", "tiny-taesd-gelu", "tiny-taesd-mish")
KL_SEED = 1  # the stand-alone VAE's weights differ from the tiny models' own (seed 0)


def fixture_dir(name):
    return os.path.join(FIXTURES, name)


def config(name):
    with open(os.path.join(fixture_dir(name), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def reference():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with open(os.path.join(FIXTURES, "reference.json"), encoding="utf-8") as f:
        ref["meta"] = json.load(f)
    return ref


def full_size():
    """{"config": madebyollin/taesd's diffusers config, "shapes": {key: shape}} of the full TAESD."""
    with open(os.path.join(FIXTURES, "taesd-full.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["shapes"] = {k: tuple(v) for k, v in data["shapes"].items()}
    return data


def weights(shapes, seed=0):
    """{diffusers key: float32 array} for {key: shape}."""
    return random_state_dict(shapes, seed)


def _save(tensors, path):
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    else:  # .pth / .pt / .ckpt: a torch zip file, a bare state dict (as torch.save(model.state_dict()))
        save_torch_zip(module_state_dict(tensors), path, wrap_in_state_dict=False)
    return path


def write_diffusers_folder(cfg, state, dst):
    """A diffusers model folder: config.json + diffusion_pytorch_model.safetensors."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    _save(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return dst


def original_taesd(state):
    """(encoder, decoder) state dicts of madebyollin's taesd.py from diffusers-named weights."""
    encoder, decoder = {}, {}
    for key, value in state.items():
        side, index, rest = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)", key).groups()
        if side == "encoder":
            encoder[f"{index}.{rest}"] = value
        else:
            decoder[f"{int(index) + 1}.{rest}"] = value
    return encoder, decoder


def write_original_taesd(state, folder, ext=".safetensors", prefix="taesd"):
    """<folder>/<prefix>_encoder<ext> and <prefix>_decoder<ext>; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    encoder, decoder = original_taesd(state)
    return (_save(encoder, os.path.join(folder, f"{prefix}_encoder{ext}")),
            _save(decoder, os.path.join(folder, f"{prefix}_decoder{ext}")))


def original_vae(state, vae_config, prefix=""):
    """A diffusers-named AutoencoderKL state dict in the LDM layout, keys under `prefix`."""
    from weights_port.vae_keys import PREFIX, original_key

    out = {}
    for key, value in state.items():
        name = original_key(key, vae_config)[len(PREFIX):]
        if re.match(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value.reshape(value.shape + (1, 1))
        out[prefix + name] = value
    return out


def write_original_vae(state, vae_config, path, prefix=""):
    return _save(original_vae(state, vae_config, prefix), path)
