"""AutoencoderTiny: TAESD (madebyollin's tiny distilled VAE for SD 1.x/2.x; TAESDXL for SDXL).

The architecture of diffusers' `AutoencoderTiny` config: plain 3x3 convolutions and small
residual blocks, no normalisation, no attention, no distribution.

    encoder  x in [-1, 1] -> (x + 1) / 2 -> layers: conv, blocks, then per further level a
             stride-2 conv (no bias) and blocks; a last conv to latent_channels
    decoder  z -> tanh(z / 3) * 3 -> layers: conv, act, then per level blocks, a nearest
             upsampling and a conv (no bias), the last level's conv (with bias) to
             out_channels -> x * 2 - 1

A block (diffusers' AutoencoderTinyBlock) is relu(conv(act(conv(act(conv(x))))) + x): its input
and output widths are always equal in this architecture, so it has no shortcut convolution.
Sublayers follow the checkpoint's `nn.Sequential` numbering (`encoder.layers.<i>`,
`decoder.layers.<i>.conv.<j>`); the parameterless entries (activations, upsamplings) hold
their places so that every index is the checkpoint's.

TAESD works in the diffusion model's own (scaled) latent space: `scaling_factor` is 1.0, and
the pipeline's `decode(latents / scaling_factor)` hands it the sampler's latents unchanged.
`latent_magnitude` and `latent_shift` only map latents to [0, 1] for storing them as 8-bit
images (`scale_latents` / `unscale_latents`, as diffusers); encode and decode never use them.
"""

from keras import ops

from diffusion_tf.layers.base import Layer, Model
from diffusion_tf.layers.conv2d import Conv2D
from diffusion_tf.layers.ops_util import gelu, silu
from diffusion_tf.models.config_util import from_config


def _mish(x):
    return x * ops.tanh(ops.softplus(x))


# diffusers' get_activation (names compared lower-case), the exact forms of torch's modules.
ACTIVATIONS = {"relu": ops.relu, "silu": silu, "swish": silu, "gelu": gelu, "mish": _mish}


def _activation_fn(name):
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"AutoencoderTiny: act_fn={name!r} is not supported; allowed: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name.lower()]


def _conv(filters, name, dtype, strides=1, use_bias=True):
    """A 3x3 convolution with PyTorch's padding=1 (stride 2: one pixel on every side, then valid)."""
    padding = "same" if strides == 1 else "valid"
    return Conv2D(filters, 3, strides=strides, padding=padding, use_bias=use_bias, name=name, dtype=dtype)


class Activation(Layer):
    """A parameterless entry of the Sequential (an activation) at its checkpoint index."""

    def __init__(self, act_fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = _activation_fn(act_fn)
        self.act_fn = act_fn

    def call(self, x):
        return self.fn(x)

    def get_config(self):
        config = super().get_config()
        config.update({"act_fn": self.act_fn})
        return config


class UpsampleNearest(Layer):
    """nn.Upsample(scale_factor=s, mode="nearest") for an integer s: each pixel repeated s x s."""

    def __init__(self, scale_factor=2, **kwargs):
        super().__init__(**kwargs)
        self.scale_factor = scale_factor

    def call(self, x):
        s = self.scale_factor
        return ops.repeat(ops.repeat(x, s, axis=1), s, axis=2)

    def get_config(self):
        config = super().get_config()
        config.update({"scale_factor": self.scale_factor})
        return config


class TinyBlock(Layer):
    """diffusers' AutoencoderTinyBlock with equal input and output widths:
    relu(conv(act(conv(act(conv(x))))) + x)."""

    def __init__(self, channels, act_fn="relu", **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        # === Layers === (conv.1 and conv.3 are the activations, as in the checkpoint)
        self.conv = [
            _conv(channels, "conv_0", policy), Activation(act_fn, name="conv_1", dtype=policy),
            _conv(channels, "conv_2", policy), Activation(act_fn, name="conv_3", dtype=policy),
            _conv(channels, "conv_4", policy),
        ]
        # === Config ===
        self.channels = channels
        self.act_fn = act_fn

    def call(self, x):
        h = x
        for layer in self.conv:
            h = layer(h)
        return ops.relu(h + x)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "act_fn": self.act_fn})
        return config


def _pad_stride2(x):
    return ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])


class EncoderTiny(Layer):
    """Image [B, H, W, 3] in [-1, 1] -> latents [B, H/f, W/f, latent_channels], f = 2^(levels-1)."""

    def __init__(self, in_channels=3, latent_channels=4, block_out_channels=(64, 64, 64, 64),
                 num_blocks=(1, 3, 3, 3), act_fn="relu", **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        # === Layers ===
        layers = []
        for level, (channels, count) in enumerate(zip(block_out_channels, num_blocks)):
            i = len(layers)
            if level == 0:
                layers.append(_conv(channels, f"layers_{i}", policy))
            else:
                layers.append(_conv(channels, f"layers_{i}", policy, strides=2, use_bias=False))
            for _ in range(count):
                layers.append(TinyBlock(channels, act_fn, name=f"layers_{len(layers)}", dtype=policy))
        layers.append(_conv(latent_channels, f"layers_{len(layers)}", policy))
        self.layers = layers
        # === Config ===
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.block_out_channels = list(block_out_channels)
        self.num_blocks = list(num_blocks)
        self.act_fn = act_fn

    def call(self, x):
        x = (x + 1.0) / 2.0
        for layer in self.layers:
            if isinstance(layer, Conv2D) and layer.strides == (2, 2):
                x = _pad_stride2(x)  # PyTorch's padding=1 of the stride-2 convolution
            x = layer(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update({
            "in_channels": self.in_channels, "latent_channels": self.latent_channels,
            "block_out_channels": self.block_out_channels, "num_blocks": self.num_blocks, "act_fn": self.act_fn,
        })
        return config


class DecoderTiny(Layer):
    """Latents [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels] in about [-1, 1]."""

    def __init__(self, out_channels=3, latent_channels=4, block_out_channels=(64, 64, 64, 64),
                 num_blocks=(3, 3, 3, 1), upsampling_scaling_factor=2, act_fn="relu", **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        # === Layers ===
        layers = [_conv(block_out_channels[0], "layers_0", policy), Activation(act_fn, name="layers_1", dtype=policy)]
        last = len(num_blocks) - 1
        for level, (channels, count) in enumerate(zip(block_out_channels, num_blocks)):
            for _ in range(count):
                layers.append(TinyBlock(channels, act_fn, name=f"layers_{len(layers)}", dtype=policy))
            if level != last:
                layers.append(UpsampleNearest(upsampling_scaling_factor, name=f"layers_{len(layers)}", dtype=policy))
                layers.append(_conv(channels, f"layers_{len(layers)}", policy, use_bias=False))
            else:
                layers.append(_conv(out_channels, f"layers_{len(layers)}", policy))
        self.layers = layers
        # === Config ===
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = list(block_out_channels)
        self.num_blocks = list(num_blocks)
        self.upsampling_scaling_factor = upsampling_scaling_factor
        self.act_fn = act_fn

    def call(self, z):
        x = ops.tanh(z / 3.0) * 3.0
        for layer in self.layers:
            x = layer(x)
        return x * 2.0 - 1.0

    def get_config(self):
        config = super().get_config()
        config.update({
            "out_channels": self.out_channels, "latent_channels": self.latent_channels,
            "block_out_channels": self.block_out_channels, "num_blocks": self.num_blocks,
            "upsampling_scaling_factor": self.upsampling_scaling_factor, "act_fn": self.act_fn,
        })
        return config


def _equal_widths(name, widths):
    if len(set(widths)) != 1:
        raise ValueError(
            f"AutoencoderTiny: {name}={list(widths)!r} is not supported: diffusers' tiny encoder and decoder "
            "feed each level's output into the next level's layers of that level's width, so only equal "
            "widths run (TAESD: 64 at every level)."
        )


class AutoencoderTiny(Model):
    """Arguments are the fields of diffusers' `AutoencoderTiny` config.

    `encode` returns the latents themselves (no distribution), `decode` takes them; the pipeline
    divides by `scaling_factor` (1.0 for TAESD) before decoding, as diffusers does.
    """

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(64, 64, 64, 64),
        decoder_block_out_channels=(64, 64, 64, 64),
        act_fn="relu",
        latent_channels=4,
        upsampling_scaling_factor=2,
        num_encoder_blocks=(1, 3, 3, 3),
        num_decoder_blocks=(3, 3, 3, 1),
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        _activation_fn(act_fn)
        for name, channels, blocks in (
            ("encoder_block_out_channels", encoder_block_out_channels, num_encoder_blocks),
            ("decoder_block_out_channels", decoder_block_out_channels, num_decoder_blocks),
        ):
            if len(channels) != len(blocks) or not channels:
                raise ValueError(
                    f"AutoencoderTiny: {name}={list(channels)!r} must have one entry per level "
                    f"({len(blocks)} in num_{name.split('_')[0]}_blocks={list(blocks)!r})."
                )
            _equal_widths(name, channels)
        if isinstance(upsampling_scaling_factor, bool) or not isinstance(upsampling_scaling_factor, int) \
                or upsampling_scaling_factor < 1:
            raise ValueError(
                f"AutoencoderTiny: upsampling_scaling_factor={upsampling_scaling_factor!r}; must be an integer >= 1."
            )
        down = 2 ** (len(num_encoder_blocks) - 1)
        up = upsampling_scaling_factor ** (len(num_decoder_blocks) - 1)
        if down != up:
            raise ValueError(
                f"AutoencoderTiny: the encoder downsamples by {down} ({len(num_encoder_blocks)} levels) but the "
                f"decoder upsamples by {up} (upsampling_scaling_factor={upsampling_scaling_factor}, "
                f"{len(num_decoder_blocks)} levels); a pipeline needs one factor for both."
            )

        # === Layers ===
        self.encoder = EncoderTiny(in_channels, latent_channels, encoder_block_out_channels, num_encoder_blocks,
                                   act_fn, name="encoder", dtype=policy)
        self.decoder = DecoderTiny(out_channels, latent_channels, decoder_block_out_channels, num_decoder_blocks,
                                   upsampling_scaling_factor, act_fn, name="decoder", dtype=policy)

        # === Config ===
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder_block_out_channels = list(encoder_block_out_channels)
        self.decoder_block_out_channels = list(decoder_block_out_channels)
        self.act_fn = act_fn
        self.latent_channels = latent_channels
        self.upsampling_scaling_factor = upsampling_scaling_factor
        self.num_encoder_blocks = list(num_encoder_blocks)
        self.num_decoder_blocks = list(num_decoder_blocks)
        self.latent_magnitude = latent_magnitude
        self.latent_shift = latent_shift
        self.scaling_factor = scaling_factor

    @classmethod
    def from_config(cls, config, **overrides):
        config = dict(config)
        # diffusers registers block_out_channels (= decoder_block_out_channels) in the saved config.
        if "block_out_channels" in config:
            given = list(config.pop("block_out_channels"))
            decoder = list(config.get("decoder_block_out_channels", (64, 64, 64, 64)))
            if given != decoder:
                raise ValueError(
                    f"AutoencoderTiny: block_out_channels={given!r} differs from decoder_block_out_channels="
                    f"{decoder!r} (diffusers writes the decoder's widths there)."
                )
        return from_config(
            cls,
            config,
            unsupported={"upsample_fn": ("nearest",), "shift_factor": (None, 0, 0.0)},
            **overrides,
        )

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.num_encoder_blocks) - 1)

    def encode(self, images):
        """[B, H, W, 3] in [-1, 1] -> latents [B, H/f, W/f, latent_channels]."""
        return self.encoder(ops.cast(images, self.compute_dtype))

    def decode(self, latents):
        """Latents -> images in about [-1, 1] (the decoder's last conv is not clamped)."""
        return self.decoder(ops.cast(latents, self.compute_dtype))

    def scale_latents(self, latents):
        """Raw latents -> [0, 1] (for storing them as 8-bit images)."""
        return ops.clip(latents / (2 * self.latent_magnitude) + self.latent_shift, 0.0, 1.0)

    def unscale_latents(self, scaled):
        """[0, 1] -> raw latents."""
        return (scaled - self.latent_shift) * (2 * self.latent_magnitude)

    def call(self, images):
        return self.decode(self.encode(images))

    def build_weights(self):
        side = self.downsampling_factor
        self(ops.zeros((1, side, side, self.in_channels)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "encoder_block_out_channels": self.encoder_block_out_channels,
                "decoder_block_out_channels": self.decoder_block_out_channels,
                "act_fn": self.act_fn,
                "latent_channels": self.latent_channels,
                "upsampling_scaling_factor": self.upsampling_scaling_factor,
                "num_encoder_blocks": self.num_encoder_blocks,
                "num_decoder_blocks": self.num_decoder_blocks,
                "latent_magnitude": self.latent_magnitude,
                "latent_shift": self.latent_shift,
                "scaling_factor": self.scaling_factor,
            }
        )
        return config
