"""ResnetBlock2D: GroupNorm-SiLU-Conv twice, with an optional timestep injection."""


from diffusion_tf.layers.ops_util import conv2d, dense, group_norm, silu
from diffusion_tf.layers.base import Layer


class ResnetBlock2D(Layer):
    """Residual block on NHWC feature maps.

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 `conv_shortcut` when they differ).
        temb_channels: channels of the timestep embedding, or `None` (VAE).
        groups: GroupNorm groups.
        eps: GroupNorm epsilon (1e-5 in the UNet, 1e-6 in the VAE).
    """

    def __init__(
        self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-5, **kwargs
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy

        # === Layers ===
        self.norm1 = group_norm(groups, eps, "norm1", policy)
        self.conv1 = conv2d(out_channels, 3, "conv1", policy)
        if temb_channels is not None:
            self.time_emb_proj = dense(out_channels, "time_emb_proj", policy)
        self.norm2 = group_norm(groups, eps, "norm2", policy)
        self.conv2 = conv2d(out_channels, 3, "conv2", policy)
        if in_channels != out_channels:
            self.conv_shortcut = conv2d(out_channels, 1, "conv_shortcut", policy)

        # === Config ===
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.temb_channels = temb_channels
        self.groups = groups
        self.eps = eps

    def call(self, x, temb=None):
        h = self.conv1(silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x)
        return x + h

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "temb_channels": self.temb_channels,
                "groups": self.groups,
                "eps": self.eps,
            }
        )
        return config
