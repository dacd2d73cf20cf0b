"""VAEDecoder: latents [B, h, w, latent_channels] -> image [B, h*f, w*f, 3] (about [-1, 1])."""


from diffusion_tf.layers.ops_util import conv2d, group_norm, silu
from diffusion_tf.layers.unet_blocks import MidBlock, UpBlock
from diffusion_tf.layers.base import Layer


class VAEDecoder(Layer):
    def __init__(
        self,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        mid_block_add_attention=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        rev = list(reversed(block_out_channels))
        common = dict(groups=norm_num_groups, eps=1e-6, dtype=policy)

        # === Layers ===
        self.conv_in = conv2d(rev[0], 3, "conv_in", policy)
        self.mid_block = MidBlock(
            rev[0], add_attention=mid_block_add_attention, name="mid_block", **common
        )
        self.up_blocks = [
            UpBlock(
                rev[max(i - 1, 0)],
                rev[i],
                layers_per_block + 1,
                add_upsample=i < len(rev) - 1,
                name=f"up_blocks_{i}",
                **common,
            )
            for i in range(len(rev))
        ]
        self.conv_norm_out = group_norm(norm_num_groups, 1e-6, "conv_norm_out", policy)
        self.conv_out = conv2d(out_channels, 3, "conv_out", policy)

        # === Config ===
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = list(block_out_channels)
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.mid_block_add_attention = mid_block_add_attention

    def call(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "out_channels": self.out_channels,
                "latent_channels": self.latent_channels,
                "block_out_channels": self.block_out_channels,
                "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups,
                "mid_block_add_attention": self.mid_block_add_attention,
            }
        )
        return config
