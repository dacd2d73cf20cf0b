"""Transformer2D: the spatial transformer of the UNet (self-attention, cross-attention, GEGLU)."""

import keras
from keras import ops

from diffusion_tf.layers.attention import Attention
from diffusion_tf.layers.linear_attention import LinearAttention
from diffusion_tf.layers.ops_util import conv2d, dense, gelu, group_norm, layer_norm
from diffusion_tf.layers.base import Layer

ATTENTION_TYPES = {"standard": Attention, "linear": LinearAttention}


def check_attention_type(attention):
    if attention not in ATTENTION_TYPES:
        raise ValueError(
            f"attention={attention!r}; allowed: {sorted(ATTENTION_TYPES)}."
        )
    return ATTENTION_TYPES[attention]


class GEGLU(Layer):
    """proj -> split in half -> hidden * gelu(gate)."""

    def __init__(self, dim_out, **kwargs):
        super().__init__(**kwargs)
        self.proj = dense(dim_out * 2, "proj", self.dtype_policy)
        self.dim_out = dim_out

    def call(self, x):
        hidden, gate = ops.split(self.proj(x), 2, axis=-1)
        return hidden * gelu(gate)

    def get_config(self):
        config = super().get_config()
        config.update({"dim_out": self.dim_out})
        return config


class FeedForward(Layer):
    """net.0 = GEGLU, net.1 = dropout (no weights, identity at inference), net.2 = Dense."""

    def __init__(self, dim, mult=4, **kwargs):
        super().__init__(**kwargs)
        self.net = [
            GEGLU(dim * mult, name="net_0", dtype=self.dtype_policy),
            keras.layers.Identity(name="net_1", dtype=self.dtype_policy),
            dense(dim, "net_2", self.dtype_policy),
        ]
        self.dim = dim
        self.mult = mult

    def call(self, x):
        for layer in self.net:
            x = layer(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update({"dim": self.dim, "mult": self.mult})
        return config


class BasicTransformerBlock(Layer):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(
        self, dim, heads, dim_head, cross_attention_dim, attention="standard", **kwargs
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self_attention_cls = check_attention_type(attention)

        # === Layers ===
        self.norm1 = layer_norm(1e-5, "norm1", policy)
        self.attn1 = self_attention_cls(dim, heads, dim_head, name="attn1", dtype=policy)
        self.norm2 = layer_norm(1e-5, "norm2", policy)
        self.attn2 = Attention(
            dim, heads, dim_head, cross_attention_dim, name="attn2", dtype=policy
        )
        self.norm3 = layer_norm(1e-5, "norm3", policy)
        self.ff = FeedForward(dim, name="ff", dtype=policy)

        # === Config ===
        self.dim = dim
        self.heads = heads
        self.dim_head = dim_head
        self.cross_attention_dim = cross_attention_dim
        self.attention = attention

    def call(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "dim": self.dim,
                "heads": self.heads,
                "dim_head": self.dim_head,
                "cross_attention_dim": self.cross_attention_dim,
                "attention": self.attention,
            }
        )
        return config


class Transformer2D(Layer):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual.

    `use_linear_projection` picks Dense (SD 2.x) or 1x1 Conv (SD 1.x) projections;
    they compute the same thing but their checkpoint weights have other shapes.
    """

    def __init__(
        self,
        channels,
        heads,
        cross_attention_dim,
        num_layers=1,
        groups=32,
        use_linear_projection=False,
        attention="standard",
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        dim_head = channels // heads

        # === Layers ===
        self.norm = group_norm(groups, 1e-6, "norm", policy)
        if use_linear_projection:
            self.proj_in = dense(channels, "proj_in", policy)
            self.proj_out = dense(channels, "proj_out", policy)
        else:
            self.proj_in = conv2d(channels, 1, "proj_in", policy)
            self.proj_out = conv2d(channels, 1, "proj_out", policy)
        self.transformer_blocks = [
            BasicTransformerBlock(
                channels,
                heads,
                dim_head,
                cross_attention_dim,
                attention=attention,
                name=f"transformer_blocks_{i}",
                dtype=policy,
            )
            for i in range(num_layers)
        ]

        # === Config ===
        self.channels = channels
        self.heads = heads
        self.cross_attention_dim = cross_attention_dim
        self.num_layers = num_layers
        self.groups = groups
        self.use_linear_projection = use_linear_projection
        self.attention = attention

    def call(self, x, context):
        b, h, w, c = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
        residual = x
        x = self.norm(x)
        # 1x1 conv and Dense are the same map on NHWC data.
        x = ops.reshape(self.proj_in(x), (b, h * w, c))
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(ops.reshape(x, (b, h, w, c)))
        return x + residual

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "heads": self.heads,
                "cross_attention_dim": self.cross_attention_dim,
                "num_layers": self.num_layers,
                "groups": self.groups,
                "use_linear_projection": self.use_linear_projection,
                "attention": self.attention,
            }
        )
        return config
