"""VAEEncoder: image [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2 * latent_channels]."""


from diffusion_tf.layers.ops_util import conv2d, group_norm, silu
from diffusion_tf.layers.unet_blocks import DownBlock, MidBlock
from diffusion_tf.layers.base import Layer


class VAEEncoder(Layer):
    def __init__(
        self,
        in_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        mid_block_add_attention=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        n = len(block_out_channels)
        common = dict(groups=norm_num_groups, eps=1e-6, dtype=policy)

        # === Layers ===
        self.conv_in = conv2d(block_out_channels[0], 3, "conv_in", policy)
        self.down_blocks = [
            DownBlock(
                block_out_channels[max(i - 1, 0)],
                block_out_channels[i],
                layers_per_block,
                add_downsample=i < n - 1,
                downsample_padding="asymmetric",
                name=f"down_blocks_{i}",
                **common,
            )
            for i in range(n)
        ]
        self.mid_block = MidBlock(
            block_out_channels[-1], add_attention=mid_block_add_attention, name="mid_block", **common
        )
        self.conv_norm_out = group_norm(norm_num_groups, 1e-6, "conv_norm_out", policy)
        self.conv_out = conv2d(2 * latent_channels, 3, "conv_out", policy)

        # === Config ===
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.block_out_channels = list(block_out_channels)
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.mid_block_add_attention = mid_block_add_attention

    def call(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "latent_channels": self.latent_channels,
                "block_out_channels": self.block_out_channels,
                "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups,
                "mid_block_add_attention": self.mid_block_add_attention,
            }
        )
        return config
