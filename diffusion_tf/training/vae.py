"""The trained VAE outside a run: loading it from a model folder, a --save folder or a
checkpoint, and the round trip of images through it (what `python -m diffusion_tf.eval
--vae-roundtrip` judges)."""

import json
import os

import numpy as np
from keras import ops

from diffusion_tf.components import build_model
from diffusion_tf.training.checkpoint import checkpoint_path, models_from_checkpoint, read_checkpoint_meta
from diffusion_tf.training.pictures import to_uint8


def load_vae_from(source):
    """The AutoencoderKL of `source`: a model folder (config.json + vae.weights.h5), a
    training run's --save folder (its checkpoints/vae.h5) or such a checkpoint file (EMA
    weights). ValueError naming the path when it is none of these."""
    from diffusion_tf.state_dict import load_weights

    path = os.fspath(source)
    if os.path.isfile(os.path.join(path, "vae.weights.h5")) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            vae = build_model("vae", json.load(f)["vae"])
        load_weights(vae, os.path.join(path, "vae.weights.h5"))
        return vae
    checkpoint = path if os.path.isfile(path) else checkpoint_path(path, "vae")
    if os.path.isfile(checkpoint):
        return models_from_checkpoint(checkpoint, read_checkpoint_meta(checkpoint)["configs"], ["vae"])["vae"]
    raise ValueError(
        f"{path!r} is not a model folder (config.json and vae.weights.h5), a training --save folder "
        "with checkpoints/vae.h5, or a VAE training checkpoint."
    )


def vae_roundtrip(vae, images, batch=100):
    """uint8 images [n, h, w, 3] -> uint8 decode(encode(images)) (posterior means, no sampling),
    `batch` images per call."""
    out = []
    for b in range(0, len(images), batch):
        x = ops.cast(images[b:b + batch], "float32") / 127.5 - 1.0
        out.append(to_uint8(ops.convert_to_numpy(ops.cast(vae.decode(vae.encode(x)), "float32"))))
    return np.concatenate(out, axis=0)
