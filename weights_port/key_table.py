"""How one of our weights is found in a source checkpoint.

A key table maps each of our keys (diffusers names, PyTorch layouts) to a
`Source`: the candidate checkpoint keys (the first present wins) and an
optional operation. The operations are the complete list of layout changes:

    split(i, n)   part i of n along axis 0 (OpenCLIP's fused in_proj q/k/v)
    transpose     the 2-D checkpoint tensor transposed (OpenCLIP's `text_projection`
                  is stored [hidden, projection], transformers' `text_projection.weight`
                  [projection, hidden]); applied before the reshape below
    (reshape)     drops or adds trailing 1x1 dims when only they differ
                  (VAE attention stored as 1x1 convs; proj_in as conv or linear)
"""

from dataclasses import dataclass

import numpy as np

from weights_port.errors import CheckpointError


@dataclass(frozen=True)
class Source:
    keys: tuple
    split: tuple = None  # (index, parts)
    transpose: bool = False  # the checkpoint tensor is our weight transposed (2-D)

    def find(self, tensors):
        for key in self.keys:
            if key in tensors:
                return key
        return None


def squeeze_to(value, shape, key):
    """`value` reshaped to `shape` when they differ only by size-1 dims, else an error."""
    shape = tuple(shape)
    if value.shape == shape:
        return value
    if [d for d in value.shape if d != 1] == [d for d in shape if d != 1]:
        return value.reshape(shape)
    raise CheckpointError(f"{key}: checkpoint shape {value.shape} does not fit expected {shape}.")


def resolve(table, tensors, shapes, what):
    """{our key: array} from `tensors` by `table`; returns (state_dict, used checkpoint keys).

    Raises CheckpointError naming every missing key (up to 10) and any shape mismatch.
    """
    state, used, missing = {}, set(), []
    for key, source in table.items():
        found = source.find(tensors)
        if found is None:
            missing.append(f"{key} (from {' or '.join(source.keys)})")
            continue
        value = np.asarray(tensors[found])
        used.add(found)
        if source.split is not None:
            index, parts = source.split
            if value.shape[0] % parts:
                raise CheckpointError(
                    f"{found}: first dim {value.shape[0]} is not divisible into {parts} parts."
                )
            size = value.shape[0] // parts
            value = value[index * size : (index + 1) * size]
        if source.transpose:
            if value.ndim != 2:
                raise CheckpointError(f"{found}: expected a 2-D tensor to transpose, got shape {value.shape}.")
            value = value.T
        state[key] = squeeze_to(value, shapes[key], found)
    if missing:
        raise CheckpointError(
            f"{what}: {len(missing)} weights not found in the checkpoint, e.g. {missing[:10]}."
        )
    return state, used


def invert(table, state_dict, extra=None):
    """Our state dict -> checkpoint tensors under the table's first candidate keys.

    Used to write reference single-file checkpoints for tests; the inverse of `resolve`.
    """
    out, fused = {}, {}
    for key, source in table.items():
        target = source.keys[0]
        value = np.asarray(state_dict[key])
        if source.transpose:
            value = np.ascontiguousarray(value.T)
        if source.split is None:
            out[target] = value
        else:
            fused.setdefault(target, {})[source.split[0]] = value
    for target, parts in fused.items():
        out[target] = np.concatenate([parts[i] for i in sorted(parts)], axis=0)
    out.update(extra or {})
    return out
