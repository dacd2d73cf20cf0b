"""Deterministic random weights, identical with or without PyTorch.

Every tensor is drawn from a NumPy generator seeded by (seed, crc32(key)), so the
fixture script (which loads them into diffusers) and the default tests (which
load them into our models) get the same values from the key and shape alone.
Scales keep activations O(1): weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1),
biases ~ N(0, 0.05), embeddings ~ N(0, 0.5).
"""

import zlib

import numpy as np


def random_tensor(key, shape, seed=0):
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    shape = tuple(int(s) for s in shape)
    if "embedding" in key:
        value = 0.5 * rng.standard_normal(shape)
    elif key.endswith("bias"):
        value = 0.05 * rng.standard_normal(shape)
    elif len(shape) == 1:  # norm scale
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        fan_in = int(np.prod(shape[1:]))
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
    return value.astype(np.float32)


def random_state_dict(shapes, seed=0):
    """{key: shape} -> {key: float32 array}."""
    return {key: random_tensor(key, shape, seed) for key, shape in sorted(shapes.items())}
