"""Sinusoidal timestep features, the guidance-scale embedding of distilled UNets and the timestep MLP of the UNet."""

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


def guidance_scale_embedding(w, dim):
    """[B] guidance weights w -> [B, dim] float32: the sinusoidal embedding of 1000 w, sin half
    first (diffusers' `get_guidance_scale_embedding`, after VDM's timestep embedding), the
    `timestep_cond` a guidance-distilled UNet (LCM, `time_cond_proj_dim`) was trained with.
    Frequencies exp(-k log(10000) / (dim // 2 - 1)), k < dim // 2; an odd `dim` ends in a 0."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ValueError(f"dim={dim!r}; must be an integer >= 4 (the UNet's time_cond_proj_dim).")
    half = dim // 2
    # log(10000) and its ratio in float32, as the reference computes them
    step = ops.log(ops.convert_to_tensor(10000.0, "float32")) / float(half - 1)
    freqs = ops.exp(ops.arange(half, dtype="float32") * -step)
    args = (ops.cast(ops.reshape(w, (-1,)), "float32") * 1000.0)[:, None] * freqs[None, :]
    emb = ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = ops.pad(emb, [[0, 0], [0, 1]])
    return emb


class TimestepEmbedding(Layer):
    """linear_1 -> SiLU -> linear_2 (diffusers' `TimestepEmbedding`).

    `cond_proj_dim` (distilled UNets' `time_cond_proj_dim`): a bias-free `cond_proj` maps an extra
    condition (a guidance-scale embedding) to the input width and adds it before linear_1; its
    width is `in_channels` (the input's, required then)."""

    def __init__(self, time_embed_dim, cond_proj_dim=None, in_channels=None, **kwargs):
        super().__init__(**kwargs)
        if cond_proj_dim is not None and in_channels is None:
            raise ValueError("TimestepEmbedding: cond_proj_dim needs in_channels (the input width).")
        # === Layers ===
        self.cond_proj = (None if cond_proj_dim is None
                          else dense(in_channels, "cond_proj", self.dtype_policy, use_bias=False))
        self.linear_1 = dense(time_embed_dim, "linear_1", self.dtype_policy)
        self.linear_2 = dense(time_embed_dim, "linear_2", self.dtype_policy)
        # === Config ===
        self.time_embed_dim = time_embed_dim
        self.cond_proj_dim = cond_proj_dim
        self.in_channels = in_channels

    def call(self, x, condition=None):
        if self.cond_proj is not None:
            if condition is None:
                raise ValueError(
                    f"this UNet embeds a condition of width {self.cond_proj_dim} with the timestep "
                    "(time_cond_proj_dim: a guidance-distilled model); pass timestep_cond.")
            x = x + self.cond_proj(ops.cast(condition, x.dtype))
        return self.linear_2(silu(self.linear_1(x)))

    def get_config(self):
        config = super().get_config()
        config.update({"time_embed_dim": self.time_embed_dim, "cond_proj_dim": self.cond_proj_dim,
                       "in_channels": self.in_channels})
        return config
