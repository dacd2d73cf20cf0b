"""Sinusoidal timestep features and the timestep MLP of the UNet."""

import math

from keras import ops

from diffusion_tf.layers.ops_util import dense, silu
from diffusion_tf.layers.base import Layer


def timestep_features(timesteps, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """[B] timesteps -> [B, dim] float32 sinusoidal features (DDPM / diffusers `Timesteps`)."""
    half = dim // 2
    exponent = -math.log(max_period) * ops.arange(half, dtype="float32") / (half - freq_shift)
    args = ops.cast(timesteps, "float32")[:, None] * ops.exp(exponent)[None, :]
    sin, cos = ops.sin(args), ops.cos(args)
    emb = ops.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = ops.pad(emb, [[0, 0], [0, 1]])
    return emb


class TimestepEmbedding(Layer):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, time_embed_dim, **kwargs):
        super().__init__(**kwargs)
        # === Layers ===
        self.linear_1 = dense(time_embed_dim, "linear_1", self.dtype_policy)
        self.linear_2 = dense(time_embed_dim, "linear_2", self.dtype_policy)
        # === Config ===
        self.time_embed_dim = time_embed_dim

    def call(self, x):
        return self.linear_2(silu(self.linear_1(x)))

    def get_config(self):
        config = super().get_config()
        config.update({"time_embed_dim": self.time_embed_dim})
        return config
