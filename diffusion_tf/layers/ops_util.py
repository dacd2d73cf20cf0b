"""Small numeric helpers used by several layers (activations, group norm factory)."""

import keras
from keras import ops


def silu(x):
    return x * ops.sigmoid(x)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def gelu(x):
    # The exact (erf) form, as torch.nn.functional.gelu and HF "gelu".
    return ops.gelu(x, approximate=False)


ACTIVATIONS = {"silu": silu, "swish": silu, "quick_gelu": quick_gelu, "gelu": gelu}


def get_activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]


def group_norm(groups, epsilon, name, dtype):
    """GroupNorm over the channel (last) axis; statistics in float32."""
    from diffusion_tf.layers.group_norm import GroupNormalization

    return GroupNormalization(groups=groups, epsilon=epsilon, name=name, dtype=dtype)


def layer_norm(epsilon, name, dtype):
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)


def conv2d(filters, kernel_size, name, dtype, strides=1, padding="same"):
    from diffusion_tf.layers.conv2d import Conv2D

    return Conv2D(
        filters, kernel_size, strides=strides, padding=padding, name=name, dtype=dtype
    )


def dense(units, name, dtype, use_bias=True):
    return keras.layers.Dense(units, use_bias=use_bias, name=name, dtype=dtype)
