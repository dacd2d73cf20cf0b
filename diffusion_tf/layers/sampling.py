"""Downsample2D and Upsample2D with PyTorch's padding and nearest-neighbour rules."""

import numpy as np

from keras import ops

from diffusion_tf.layers.ops_util import conv2d
from diffusion_tf.layers.base import Layer


class Downsample2D(Layer):
    """Stride-2 3x3 convolution.

    `padding="symmetric"`: one pixel on every side (the UNet's `padding=1`).
    `padding="asymmetric"`: one pixel at the bottom and right only (the VAE
    encoder pads (0, 1, 0, 1) and convolves with `padding=0`).
    TensorFlow's "same" padding would put the extra pixel at the end for even
    sizes, which differs from the UNet's layout, so padding is explicit.
    """

    def __init__(self, channels, padding="symmetric", **kwargs):
        super().__init__(**kwargs)
        if padding not in ("symmetric", "asymmetric"):
            raise ValueError(
                f"padding={padding!r}; allowed: 'symmetric', 'asymmetric'."
            )
        # === Layers ===
        self.conv = conv2d(channels, 3, "conv", self.dtype_policy, strides=2, padding="valid")
        # === Config ===
        self.channels = channels
        self.padding = padding

    def call(self, x):
        if self.padding == "symmetric":
            pads = [[0, 0], [1, 1], [1, 1], [0, 0]]
        else:
            pads = [[0, 0], [0, 1], [0, 1], [0, 0]]
        return self.conv(ops.pad(x, pads))

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "padding": self.padding})
        return config


def _nearest_indices(size_in, size_out):
    # torch.nn.functional.interpolate(mode="nearest"): src = floor(dst * in / out).
    return np.floor(np.arange(size_out) * (size_in / size_out)).astype("int32")


def resize_nearest(x, size):
    """Nearest-neighbour resize of NHWC `x` to static `size` = (h, w), as PyTorch does."""
    h_in, w_in = x.shape[1], x.shape[2]
    h_out, w_out = size
    if h_out == 2 * h_in and w_out == 2 * w_in:
        return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
    x = ops.take(x, _nearest_indices(h_in, h_out), axis=1)
    return ops.take(x, _nearest_indices(w_in, w_out), axis=2)


class Upsample2D(Layer):
    """Nearest-neighbour upsampling (x2, or to a given size) then a 3x3 convolution."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        # === Layers ===
        self.conv = conv2d(channels, 3, "conv", self.dtype_policy)
        # === Config ===
        self.channels = channels

    def call(self, x, size=None):
        if size is None:
            size = (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(resize_nearest(x, size))

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels})
        return config
