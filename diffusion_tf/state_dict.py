"""Checkpoint-style names for the variables of a model, and loading/saving by name.

A model's weights are addressed by the keys diffusers / transformers use
(`down_blocks.0.resnets.1.conv1.weight`): the key of a variable is the path of
attribute names from the model to the Keras layer that owns it, list indices
included, then the PyTorch parameter name. Only three layouts differ from
PyTorch's, and they are the complete list of transposes:

    Dense  kernel [in, out]          <-> weight [out, in]
    Conv2D kernel [kh, kw, in, out]  <-> weight [out, in, kh, kw]
    norms  gamma / beta, Embedding embeddings <-> weight / bias, weight (no transpose)

Our weight files (`*.weights.h5`) store these keys with PyTorch layouts, so a
diffusers state dict converts by name alone.
"""

import os
import tempfile

import h5py
import keras
import numpy as np

from diffusion_tf.layers.group_norm import GroupNormalization

# Keras class -> {variable attribute: (torch parameter name, to_torch transpose)}
_PARAMS = {
    GroupNormalization: {"gamma": ("weight", None), "beta": ("bias", None)},
    keras.layers.Dense: {"kernel": ("weight", (1, 0)), "bias": ("bias", None)},
    keras.layers.Conv2D: {"kernel": ("weight", (3, 2, 0, 1)), "bias": ("bias", None)},
    keras.layers.LayerNormalization: {"gamma": ("weight", None), "beta": ("bias", None)},
    keras.layers.GroupNormalization: {"gamma": ("weight", None), "beta": ("bias", None)},
    keras.layers.Embedding: {"embeddings": ("weight", None)},
}


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model."""


def _leaf_params(layer):
    for cls, params in _PARAMS.items():
        if isinstance(layer, cls):
            return params
    return None


def named_variables(model):
    """{key: (keras variable, to_torch transpose or None)} for every weight of `model`."""
    out = {}

    def visit(layer, prefix):
        params = _leaf_params(layer)
        if params is not None:
            for attr, (name, perm) in params.items():
                variable = getattr(layer, attr, None)
                if variable is not None:
                    out[prefix + name] = (variable, perm)
            return
        for attr, value in vars(layer).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, keras.layers.Layer):
                visit(value, f"{prefix}{attr}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, keras.layers.Layer):
                        visit(item, f"{prefix}{attr}.{i}.")

    visit(model, "")
    n_vars = len(model.weights)
    if n_vars != len(out):
        raise RuntimeError(
            f"{type(model).__name__}: {n_vars} variables but {len(out)} named ones; "
            "a layer is not reachable through public attributes."
        )
    return out


def _to_torch(value, perm):
    return np.transpose(value, perm) if perm else value


def state_dict_shapes(model):
    """{key: shape in the PyTorch layout} of `model`'s weights, without copying any of them."""
    return {key: tuple(var.shape[i] for i in perm) if perm else tuple(var.shape)
            for key, (var, perm) in named_variables(model).items()}


def get_state_dict(model):
    """{key: numpy array in PyTorch layout}."""
    return {
        key: _to_torch(keras.ops.convert_to_numpy(var), perm)
        for key, (var, perm) in named_variables(model).items()
    }


def set_state_dict(model, state_dict, source="state dict", progress=None):
    """Assign a PyTorch-layout state dict to `model`, strictly.

    Every variable must get a value of the right shape and every entry must be
    used; otherwise a WeightsError names the keys, and the model is unchanged
    (all checks run before the first assignment). `progress(done, total)`, if given,
    is called after each tensor is assigned.
    """
    variables = named_variables(model)
    missing = sorted(set(variables) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(variables))
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__} (corrupt or for another model): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}."
        )
    # Pass 1 checks every value and keeps none of them; pass 2 converts and assigns one
    # tensor at a time. Peak memory is then the model plus one tensor (plus whatever the
    # caller's mapping holds: a lazily read weights file holds nothing).
    for key, (var, perm) in variables.items():
        value = np.asarray(state_dict[key])
        expected = tuple(_to_torch(np.empty(var.shape, dtype="b"), perm).shape)
        if value.shape != expected:
            raise WeightsError(
                f"{source}: {key} has shape {value.shape}, {type(model).__name__} expects "
                f"{expected} (corrupt or for another model)."
            )
        if not np.all(np.isfinite(value)):
            raise WeightsError(f"{source}: {key} contains NaN or Inf values.")
        del value
    for done, (key, (var, perm)) in enumerate(variables.items(), 1):
        inverse = tuple(np.argsort(perm)) if perm else None
        var.assign(np.ascontiguousarray(_to_torch(np.asarray(state_dict[key]), inverse), dtype=var.dtype))
        if progress is not None:
            progress(done, len(variables))


def save_weights(model, path, dtype=None, progress=None):
    """Write the model's state dict to an HDF5 file, atomically (temp file + rename).

    `progress(done, total)`, if given, is called after each tensor is written. One tensor is
    copied out at a time (SDXL's UNet alone is 10 GB in float32)."""
    variables = named_variables(model)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "diffusion_tf.state_dict.v1"
            f.attrs["model"] = type(model).__name__
            for done, (key, (var, perm)) in enumerate(variables.items(), 1):
                value = _to_torch(keras.ops.convert_to_numpy(var), perm)
                f.create_dataset(key, data=value.astype(dtype) if dtype else value)
                del value
                if progress is not None:
                    progress(done, len(variables))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _WeightsFile:
    """A read-only mapping over an open weights file; each access reads one tensor."""

    def __init__(self, path, handle):
        self.path, self.handle = path, handle

    def __iter__(self):
        return iter(self.handle.keys())

    def __contains__(self, key):
        return key in self.handle

    def __len__(self):
        return len(self.handle)

    def keys(self):
        return list(self.handle.keys())

    def __getitem__(self, key):
        try:
            return self.handle[key][()]
        except Exception as e:  # a damaged dataset
            raise WeightsError(
                f"weights file {self.path!r} is corrupt or for another model ({type(e).__name__}: {e})."
            ) from None


def _open_weights(path):
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist.")
    try:
        handle = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError/KeyError/... on damaged files
        raise WeightsError(
            f"weights file {path!r} is corrupt or for another model ({type(e).__name__}: {e})."
        ) from None
    if handle.attrs.get("format") != "diffusion_tf.state_dict.v1":
        handle.close()
        raise WeightsError(f"{path!r} is not a diffusion_tf weights file.")
    return handle


def read_weights(path):
    """Read a `*.weights.h5` written by `save_weights` into {key: array}."""
    with _open_weights(path) as handle:
        weights = _WeightsFile(path, handle)
        return {key: weights[key] for key in weights.keys()}


def load_weights(model, path):
    """Assign a `*.weights.h5` to `model`, reading one tensor at a time (the model is unchanged
    if anything does not fit)."""
    with _open_weights(path) as handle:
        set_state_dict(model, _WeightsFile(path, handle), source=f"weights file {path!r}")
