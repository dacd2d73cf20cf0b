"""SpatialAttention: the VAE's single-head self-attention over an NHWC map, with residual."""

from keras import ops

from diffusion_tf.layers.attention import Attention
from diffusion_tf.layers.ops_util import group_norm


class SpatialAttention(Attention):
    """group_norm -> attention over the H*W positions -> + input.

    Same keys as diffusers' VAE attention: group_norm, to_q, to_k, to_v, to_out.0
    (all with biases), one head of `channels` features.
    """

    def __init__(self, channels, groups=32, eps=1e-6, **kwargs):
        super().__init__(channels, 1, channels, qkv_bias=True, **kwargs)
        self.group_norm = group_norm(groups, eps, "group_norm", self.dtype_policy)
        self.channels = channels
        self.groups = groups
        self.eps = eps

    def call(self, x):
        b, h, w, c = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
        tokens = ops.reshape(self.group_norm(x), (b, h * w, c))
        out = super().call(tokens)
        return x + ops.reshape(out, (b, h, w, c))

    def get_config(self):
        config = super().get_config()
        for key in ("query_dim", "heads", "dim_head", "cross_attention_dim", "qkv_bias"):
            config.pop(key)
        config.update({"channels": self.channels, "groups": self.groups, "eps": self.eps})
        return config
