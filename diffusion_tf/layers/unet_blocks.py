"""The down, mid and up blocks shared by the UNet and the VAE.

One class per role, configured by flags instead of diffusers' eight block classes:
    CrossAttnDownBlock2D / DownBlock2D / DownEncoderBlock2D -> DownBlock
    UNetMidBlock2DCrossAttn / UNetMidBlock2D               -> MidBlock
    CrossAttnUpBlock2D / UpBlock2D / UpDecoderBlock2D      -> UpBlock
`transformer` is a dict of Transformer2D arguments (heads, cross_attention_dim,
use_linear_projection, attention, num_layers), or None for blocks without
cross-attention.
"""

from keras import ops

from diffusion_tf.layers.resnet_block import ResnetBlock2D
from diffusion_tf.layers.sampling import Downsample2D, Upsample2D
from diffusion_tf.layers.spatial_attention import SpatialAttention
from diffusion_tf.layers.transformer_2d import Transformer2D
from diffusion_tf.layers.base import Layer


def _transformers(transformer, channels, count, groups, policy):
    if transformer is None:
        return []
    return [
        Transformer2D(channels, groups=groups, name=f"attentions_{i}", dtype=policy, **transformer)
        for i in range(count)
    ]


class DownBlock(Layer):
    """`num_layers` resnets (each optionally followed by a Transformer2D), then a downsampler."""

    def __init__(
        self,
        in_channels,
        out_channels,
        num_layers,
        temb_channels=None,
        add_downsample=True,
        downsample_padding="symmetric",
        groups=32,
        eps=1e-5,
        transformer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy

        # === Layers ===
        self.resnets = [
            ResnetBlock2D(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels,
                groups,
                eps,
                name=f"resnets_{i}",
                dtype=policy,
            )
            for i in range(num_layers)
        ]
        self.attentions = _transformers(transformer, out_channels, num_layers, groups, policy)
        self.downsamplers = (
            [Downsample2D(out_channels, downsample_padding, name="downsamplers_0", dtype=policy)]
            if add_downsample
            else []
        )

        # === Config ===
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.temb_channels = temb_channels
        self.add_downsample = add_downsample
        self.downsample_padding = downsample_padding
        self.groups = groups
        self.eps = eps
        self.transformer = transformer

    def call(self, x, temb=None, context=None):
        """Returns the output and the list of skip tensors (one per layer and downsampler)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "num_layers": self.num_layers,
                "temb_channels": self.temb_channels,
                "add_downsample": self.add_downsample,
                "downsample_padding": self.downsample_padding,
                "groups": self.groups,
                "eps": self.eps,
                "transformer": self.transformer,
            }
        )
        return config


class MidBlock(Layer):
    """resnet, attention, resnet. The attention is a Transformer2D when `transformer` is
    given (UNet), else the VAE's single-head SpatialAttention (or none if `add_attention`
    is False)."""

    def __init__(
        self,
        channels,
        temb_channels=None,
        groups=32,
        eps=1e-5,
        transformer=None,
        add_attention=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy

        # === Layers ===
        self.resnets = [
            ResnetBlock2D(
                channels, channels, temb_channels, groups, eps, name=f"resnets_{i}", dtype=policy
            )
            for i in range(2)
        ]
        if transformer is not None:
            self.attentions = _transformers(transformer, channels, 1, groups, policy)
        elif add_attention:
            self.attentions = [
                SpatialAttention(channels, groups, eps, name="attentions_0", dtype=policy)
            ]
        else:
            self.attentions = []

        # === Config ===
        self.channels = channels
        self.temb_channels = temb_channels
        self.groups = groups
        self.eps = eps
        self.transformer = transformer
        self.add_attention = add_attention

    def call(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        for attention in self.attentions:
            x = attention(x, context) if self.transformer is not None else attention(x)
        return self.resnets[1](x, temb)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "temb_channels": self.temb_channels,
                "groups": self.groups,
                "eps": self.eps,
                "transformer": self.transformer,
                "add_attention": self.add_attention,
            }
        )
        return config


class UpBlock(Layer):
    """`num_layers` resnets (each optionally followed by a Transformer2D), then an upsampler.

    With `skip_channels` (a list, one per layer; UNet) each resnet first concatenates the
    matching skip tensor from the down path; with `skip_channels=None` (VAE decoder) not.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        num_layers,
        skip_channels=None,
        temb_channels=None,
        add_upsample=True,
        groups=32,
        eps=1e-5,
        transformer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        skips = skip_channels or [0] * num_layers

        # === Layers ===
        self.resnets = [
            ResnetBlock2D(
                (in_channels if i == 0 else out_channels) + skips[i],
                out_channels,
                temb_channels,
                groups,
                eps,
                name=f"resnets_{i}",
                dtype=policy,
            )
            for i in range(num_layers)
        ]
        self.attentions = _transformers(transformer, out_channels, num_layers, groups, policy)
        self.upsamplers = (
            [Upsample2D(out_channels, name="upsamplers_0", dtype=policy)] if add_upsample else []
        )

        # === Config ===
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_layers = num_layers
        self.skip_channels = skip_channels
        self.temb_channels = temb_channels
        self.add_upsample = add_upsample
        self.groups = groups
        self.eps = eps
        self.transformer = transformer

    def call(self, x, skips=None, temb=None, context=None, upsample_size=None):
        """`skips` are consumed from the end (the last skip pairs with the first resnet)."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = ops.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, size=upsample_size)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "num_layers": self.num_layers,
                "skip_channels": self.skip_channels,
                "temb_channels": self.temb_channels,
                "add_upsample": self.add_upsample,
                "groups": self.groups,
                "eps": self.eps,
                "transformer": self.transformer,
            }
        )
        return config
