"""AutoencoderKL: the Stable Diffusion VAE (encoder, quant convs, decoder)."""

import keras
from keras import ops

from diffusion_tf.models.config_util import from_config
from diffusion_tf.models.vae_decoder import VAEDecoder
from diffusion_tf.models.vae_encoder import VAEEncoder
from diffusion_tf.layers.base import Model


class AutoencoderKL(Model):
    """Arguments are the fields of diffusers' `AutoencoderKL` config.

    `encode` returns the posterior mean, `decode` takes unscaled latents; the
    pipeline applies `scaling_factor` (0.18215 for SD 1.x/2.x).
    """

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
        mid_block_add_attention=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        arch = dict(
            latent_channels=latent_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
            dtype=policy,
        )

        # === Layers ===
        self.encoder = VAEEncoder(in_channels, name="encoder", **arch)
        self.quant_conv = keras.layers.Conv2D(2 * latent_channels, 1, name="quant_conv", dtype=policy)
        self.post_quant_conv = keras.layers.Conv2D(latent_channels, 1, name="post_quant_conv", dtype=policy)
        self.decoder = VAEDecoder(out_channels, name="decoder", **arch)

        # === Config ===
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.block_out_channels = list(block_out_channels)
        self.layers_per_block = layers_per_block
        self.latent_channels = latent_channels
        self.norm_num_groups = norm_num_groups
        self.sample_size = sample_size
        self.scaling_factor = scaling_factor
        self.mid_block_add_attention = mid_block_add_attention

    @classmethod
    def from_config(cls, config, **overrides):
        return from_config(
            cls,
            config,
            unsupported={
                "act_fn": ("silu",),
                "down_block_types": lambda v: set(v) == {"DownEncoderBlock2D"},
                "up_block_types": lambda v: set(v) == {"UpDecoderBlock2D"},
                "shift_factor": (None, 0, 0.0),
                "use_quant_conv": (True,),
                "use_post_quant_conv": (True,),
            },
            **overrides,
        )

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)

    def encode_moments(self, images):
        """[B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.quant_conv(self.encoder(ops.cast(images, self.compute_dtype)))
        return ops.split(moments, 2, axis=-1)

    def encode(self, images):
        return self.encode_moments(images)[0]

    def decode(self, latents):
        return self.decoder(self.post_quant_conv(ops.cast(latents, self.compute_dtype)))

    def call(self, images):
        return self.decode(self.encode(images))

    def build_weights(self):
        side = 2 * self.downsampling_factor  # 2x2 latents: no attention over a single position
        self(ops.zeros((1, side, side, self.in_channels)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "block_out_channels": self.block_out_channels,
                "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels,
                "norm_num_groups": self.norm_num_groups,
                "sample_size": self.sample_size,
                "scaling_factor": self.scaling_factor,
                "mid_block_add_attention": self.mid_block_add_attention,
            }
        )
        return config
