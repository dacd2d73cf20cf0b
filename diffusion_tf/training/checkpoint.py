"""The HDF5 training checkpoint: one file per stage holding the whole training state
(weights, EMA weights, optimizer variables, loss history, JSON metadata), written atomically.

Layout of checkpoints/<stage>.h5: attrs "format" (`CHECKPOINT_FORMAT`) and "meta" (JSON:
epoch, step, options, configs, ...); groups weights/<component>/<key>, ema/<component>/<key>
(Keras layout, keys of `state_dict.named_variables`), optimizer/<00000...> (each with its
variable's "path" attribute), history/<loss | epoch_loss | val_loss | adherence>, and the
stage's extra arrays (the UNet stage: frozen/vae/<key>, the VAE it was trained with).
"""

import json
import os

from keras import ops

from diffusion_tf.components import build_model
from diffusion_tf.state_dict import named_variables
from diffusion_tf.training.files import atomic_file

CHECKPOINT_FORMAT = "diffusion_tf.train_checkpoint.v1"


def checkpoint_path(save, stage):
    return os.path.join(save, "checkpoints", f"{stage}.h5")


def read_checkpoint_meta(path):
    """The JSON metadata of a training checkpoint; ValueError if it is not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path!r} is not a diffusion_tf training checkpoint.")
            return json.loads(f.attrs["meta"])
    except ValueError:
        raise
    except Exception as e:  # h5py: OSError/KeyError on damaged files
        raise ValueError(f"training checkpoint {path!r} is corrupt ({type(e).__name__}: {e}).") from None


def keras_state(model, values=None):
    """{key: numpy array, Keras layout} of the model's variables (or of `values`: var -> variable)."""
    out = {}
    for key, (var, _) in named_variables(model).items():
        source = values(var) if values else var
        out[key] = ops.convert_to_numpy(source)
    return out


def assign_state(model, state, source, values=None):
    """Assigns `keras_state`-style arrays to the model's variables (or to `values(var)`);
    every key and shape is checked before the first assignment (ValueError naming `source`)."""
    variables = named_variables(model)
    if set(variables) != set(state):
        raise ValueError(f"{source} does not fit {type(model).__name__} (another architecture?).")
    for key, (var, _) in variables.items():
        target = values(var) if values else var
        if tuple(target.shape) != tuple(state[key].shape):
            raise ValueError(f"{source}: {key} has shape {state[key].shape}, expected {tuple(target.shape)}.")
    for key, (var, _) in variables.items():
        (values(var) if values else var).assign(state[key])


def write_checkpoint(path, trainer, meta, extra_arrays=None):
    """Everything `restore_checkpoint` needs, written to a temp file and renamed into place."""
    import h5py

    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = CHECKPOINT_FORMAT
            f.attrs["meta"] = json.dumps(meta)
            for name, model in trainer.components.items():
                for group, values in (("weights", None), ("ema", trainer.ema.average_of)):
                    g = f.require_group(f"{group}/{name}")
                    for key, value in keras_state(model, values).items():
                        g.create_dataset(key, data=value)
            g = f.create_group("optimizer")
            for i, var in enumerate(trainer.optimizer.variables):
                d = g.create_dataset(f"{i:05d}", data=ops.convert_to_numpy(var))
                d.attrs["path"] = var.path
            for key, value in (extra_arrays or {}).items():
                f.create_dataset(key, data=value)


def read_checkpoint_arrays(path, group):
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[group][k][()] for k in f[group].keys()} if group in f else {}


def restore_checkpoint(path, trainer):
    """Assigns weights, EMA weights and optimizer variables; returns the metadata."""
    import h5py

    meta = read_checkpoint_meta(path)
    with h5py.File(path, "r") as f:
        for name, model in trainer.components.items():
            weights = {k: v[()] for k, v in f[f"weights/{name}"].items()}
            ema = {k: v[()] for k, v in f[f"ema/{name}"].items()}
            assign_state(model, weights, f"{path} [weights/{name}]")
            assign_state(model, ema, f"{path} [ema/{name}]", trainer.ema.average_of)
        stored = f["optimizer"]
        variables = trainer.optimizer.variables
        if len(stored) != len(variables):
            raise ValueError(f"{path}: {len(stored)} optimizer variables, the optimizer has {len(variables)}.")
        for i, var in enumerate(variables):
            value = stored[f"{i:05d}"][()]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{path}: optimizer variable {var.path} has shape {value.shape}.")
            var.assign(value)
    return meta


def empty_history():
    # loss: every step; epoch_loss: the mean of each epoch; val_loss: the loss of a fixed
    # held-out batch (fixed noise and timesteps) before training and after every epoch.
    # adherence: rows (epoch, all, color, shape, position, background) of the --eval-every judging.
    return {"loss": [], "epoch_loss": [], "val_loss": [], "adherence": [], "seconds": 0.0}


def stored_history(path):
    """The loss history of a checkpoint, as `empty_history` lays it out."""
    arrays = read_checkpoint_arrays(path, "history")
    meta = read_checkpoint_meta(path)
    history = empty_history()
    for key in ("loss", "epoch_loss", "val_loss"):
        history[key] = [float(x) for x in arrays.get(key, [])]
    history["adherence"] = [[float(x) for x in row] for row in arrays.get("adherence", [])]
    history["seconds"] = float(meta.get("train_seconds", 0.0))
    return history


def models_from_checkpoint(path, configs, components, group="ema"):
    """Fresh networks holding a checkpoint's EMA (or raw) weights."""
    out = {}
    for name in components:
        model = build_model(name, configs[name])
        assign_state(model, read_checkpoint_arrays(path, f"{group}/{name}"), f"{path} [{group}/{name}]")
        out[name] = model
    return out
