"""UNet2DConditionModel: the denoising UNet of Stable Diffusion 1.x / 2.x / XL, NHWC."""

from keras import ops

from diffusion_tf.layers.embeddings import TimestepEmbedding, timestep_features
from diffusion_tf.layers.ops_util import conv2d, group_norm, silu
from diffusion_tf.layers.transformer_2d import check_attention_type
from diffusion_tf.layers.unet_blocks import DownBlock, MidBlock, UpBlock
from diffusion_tf.models.config_util import from_config, per_block
from diffusion_tf.layers.base import Model

ADDITION_EMBED_TYPES = (None, "text_time")
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class UNet2DConditionModel(Model):
    """Predicts the noise (or v) in `latents` [B, h, w, C] at `timesteps` given `context`.

    The arguments are the fields of diffusers' `UNet2DConditionModel` config, so
    `UNet2DConditionModel.from_config(json.load(open("unet/config.json")))` builds
    SD 1.x, SD 2.x, inpainting (in_channels=9) and tiny test models alike.
    `attention_head_dim` is, as in diffusers, the number of heads per block
    unless `num_attention_heads` is given. `attention="linear"` uses
    LinearAttention for the spatial self-attention (cross-attention stays softmax).

    SDXL: `addition_embed_type="text_time"` adds to the timestep embedding an MLP (`add_embedding`)
    of the pooled text embedding concatenated with the sinusoidal features
    (`addition_time_embed_dim` each) of the micro-conditioning `time_ids` (original size, crop
    corner, target size or aesthetic score); `projection_class_embeddings_input_dim` is that
    concatenation's width. `time_cond_proj_dim`: guidance-distilled UNets (LCM) add a projected
    guidance embedding (`timestep_cond`) to the timestep features.

    `coordinate_channels=True` is an extension (not in diffusers, off in every
    converted model): conv_in also sees two channels of the latent pixel's x and y
    in [-1, 1] (CoordConv), the absolute position signal that a UNet trained from
    scratch otherwise gets only from zero padding (tried for named positions in the
    shapes model; see the README's training section).
    """

    def __init__(
        self,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
        num_attention_heads=None,
        transformer_layers_per_block=1,
        use_linear_projection=False,
        upcast_attention=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
        time_cond_proj_dim=None,
        attention="standard",
        coordinate_channels=False,
        **kwargs,
    ):
        check_attention_type(attention)
        n = len(block_out_channels)
        for name, types, allowed in (
            ("down_block_types", down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", up_block_types, UP_BLOCK_TYPES),
        ):
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(
                    f"{name}={list(types)!r}: need {n} entries from {allowed}."
                )
        if addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={addition_embed_type!r}; allowed: {ADDITION_EMBED_TYPES}.")
        if addition_embed_type == "text_time" and not (addition_time_embed_dim and projection_class_embeddings_input_dim):
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim (got {addition_time_embed_dim!r}, "
                f"{projection_class_embeddings_input_dim!r}).")
        super().__init__(**kwargs)
        policy = self.dtype_policy
        heads = per_block(num_attention_heads or attention_head_dim, n, "attention_head_dim")
        layers = per_block(layers_per_block, n, "layers_per_block")
        depth = per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        cross_dims = per_block(cross_attention_dim, n, "cross_attention_dim")
        time_dim = block_out_channels[0] * 4

        def transformer(i, has_attention):
            if not has_attention:
                return None
            return {
                "heads": heads[i],
                "cross_attention_dim": cross_dims[i],
                "num_layers": depth[i],
                "use_linear_projection": use_linear_projection,
                "attention": attention,
            }

        common = dict(temb_channels=time_dim, groups=norm_num_groups, eps=norm_eps, dtype=policy)

        # === Layers ===
        self.conv_in = conv2d(block_out_channels[0], 3, "conv_in", policy)
        self.time_embedding = TimestepEmbedding(
            time_dim, time_cond_proj_dim, block_out_channels[0], name="time_embedding", dtype=policy)
        self.add_embedding = (
            TimestepEmbedding(time_dim, name="add_embedding", dtype=policy)
            if addition_embed_type == "text_time" else None
        )
        self.down_blocks = []
        skip_channels = [block_out_channels[0]]
        for i, block_type in enumerate(down_block_types):
            block_in = block_out_channels[max(i - 1, 0)]
            out = block_out_channels[i]
            final = i == n - 1
            self.down_blocks.append(
                DownBlock(
                    block_in,
                    out,
                    layers[i],
                    add_downsample=not final,
                    transformer=transformer(i, block_type.startswith("CrossAttn")),
                    name=f"down_blocks_{i}",
                    **common,
                )
            )
            skip_channels += [out] * (layers[i] + (0 if final else 1))
        self.mid_block = MidBlock(
            block_out_channels[-1],
            transformer=transformer(n - 1, True),
            name="mid_block",
            **common,
        )
        self.up_blocks = []
        rev_channels = list(reversed(block_out_channels))
        rev_layers = list(reversed(layers))
        prev = rev_channels[0]
        for i, block_type in enumerate(up_block_types):
            count = rev_layers[i] + 1
            skips = [skip_channels.pop() for _ in range(count)]
            self.up_blocks.append(
                UpBlock(
                    prev,
                    rev_channels[i],
                    count,
                    skip_channels=skips,
                    add_upsample=i < n - 1,
                    transformer=transformer(n - 1 - i, block_type.startswith("CrossAttn")),
                    name=f"up_blocks_{i}",
                    **common,
                )
            )
            prev = rev_channels[i]
        self.conv_norm_out = group_norm(norm_num_groups, norm_eps, "conv_norm_out", policy)
        self.conv_out = conv2d(out_channels, 3, "conv_out", policy)

        # === Config ===
        self.sample_size = sample_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.down_block_types = list(down_block_types)
        self.up_block_types = list(up_block_types)
        self.block_out_channels = list(block_out_channels)
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.cross_attention_dim = cross_attention_dim
        self.attention_head_dim = attention_head_dim
        self.num_attention_heads = num_attention_heads
        self.transformer_layers_per_block = transformer_layers_per_block
        self.use_linear_projection = use_linear_projection
        self.upcast_attention = upcast_attention  # softmax always runs in float32
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.addition_embed_type = addition_embed_type
        self.addition_time_embed_dim = addition_time_embed_dim
        self.projection_class_embeddings_input_dim = projection_class_embeddings_input_dim
        self.time_cond_proj_dim = time_cond_proj_dim
        self.attention = attention
        self.coordinate_channels = bool(coordinate_channels)

    @classmethod
    def from_config(cls, config, **overrides):
        return from_config(
            cls,
            config,
            unsupported={
                "act_fn": ("silu",),
                "mid_block_type": ("UNetMidBlock2DCrossAttn",),
                "center_input_sample": (False,),
                "class_embed_type": (None,),
                "encoder_hid_dim": (None,),
                "time_embedding_type": ("positional",),
                "only_cross_attention": (False,),
                "dual_cross_attention": (False,),
                "resnet_time_scale_shift": ("default",),
                "conv_in_kernel": (3,),
                "conv_out_kernel": (3,),
                "downsample_padding": (1,),
                "mid_block_scale_factor": (1, 1.0),
                "num_class_embeds": (None,),
                "encoder_hid_dim_type": (None,),
                "attention_type": ("default",),
                "resnet_out_scale_factor": (1, 1.0),
                "cross_attention_norm": (None,),
                "time_embedding_dim": (None,),
                "time_embedding_act_fn": (None,),
                "timestep_post_act": (None,),
                "mid_block_only_cross_attention": (None, False),
                "class_embeddings_concat": (False,),
                "reverse_transformer_layers_per_block": (None,),
                "resnet_skip_time_act": (False,),
                "addition_embed_type_num_heads": lambda v: True,
                "dropout": lambda v: True,
            },
            **overrides,
        )

    @property
    def needs_added_cond(self):
        """Whether `call` needs `added_cond` (SDXL's pooled text embedding and time ids)."""
        return self.addition_embed_type == "text_time"

    def num_time_ids(self, pooled_dim):
        """How many micro-conditioning values this UNet reads next to a pooled text embedding of
        width `pooled_dim` (6 for the SDXL base: original size, crop corner, target size; 5 for
        the refiner: the aesthetic score in place of the target size); None without added
        conditions."""
        if not self.needs_added_cond:
            return None
        n, rest = divmod(self.projection_class_embeddings_input_dim - pooled_dim, self.addition_time_embed_dim)
        if rest or n < 1:
            raise ValueError(
                f"a pooled text embedding {pooled_dim} wide does not fit this UNet's add_embedding input "
                f"({self.projection_class_embeddings_input_dim} = pooled + n x {self.addition_time_embed_dim}).")
        return n

    def call(self, latents, timesteps, context, added_cond=None, timestep_cond=None):
        """latents [B, h, w, in_channels], timesteps scalar or [B], context [B, T, D];
        `added_cond` {"text_embeds": [B, P], "time_ids": [B, n]} for SDXL UNets;
        `timestep_cond` [B, time_cond_proj_dim] for guidance-distilled ones."""
        batch = ops.shape(latents)[0]
        t = ops.broadcast_to(ops.reshape(ops.cast(timesteps, "float32"), (-1,)), (batch,))
        features = timestep_features(
            t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift
        )
        temb = self.time_embedding(ops.cast(features, self.compute_dtype), timestep_cond)
        if self.add_embedding is not None:
            temb = temb + self.add_embedding(self._added_features(added_cond, batch))
        context = ops.cast(context, self.compute_dtype)

        latents = ops.cast(latents, self.compute_dtype)
        if self.coordinate_channels:
            latents = ops.concatenate([latents, self._coordinates(latents)], axis=-1)
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            size = (skips[-1].shape[1], skips[-1].shape[2]) if skips else None
            x = block(x, block_skips, temb, context, upsample_size=size)
        x = self.conv_out(silu(self.conv_norm_out(x)))
        return x

    def _added_features(self, added_cond, batch):
        """concat(text_embeds, sinusoidal features of every time id) [B, projection input dim]."""
        if not isinstance(added_cond, dict) or {"text_embeds", "time_ids"} - set(added_cond):
            raise ValueError(
                "this SDXL UNet needs added_cond={'text_embeds': pooled [B, P], 'time_ids': [B, n]} "
                f"(addition_embed_type='text_time'); got {type(added_cond).__name__}.")
        ids = ops.cast(added_cond["time_ids"], "float32")
        n = ids.shape[-1]
        time = timestep_features(ops.reshape(ids, (-1,)), self.addition_time_embed_dim,
                                 self.flip_sin_to_cos, self.freq_shift)
        time = ops.reshape(time, (-1, n * self.addition_time_embed_dim))
        text = ops.cast(added_cond["text_embeds"], "float32")
        width = text.shape[-1] + n * self.addition_time_embed_dim
        if width != self.projection_class_embeddings_input_dim:
            raise ValueError(
                f"added_cond: text_embeds width {text.shape[-1]} + {n} time ids x {self.addition_time_embed_dim} = "
                f"{width}; this UNet's add_embedding takes {self.projection_class_embeddings_input_dim}.")
        feats = ops.concatenate([text, time], axis=-1)
        feats = ops.broadcast_to(feats, (batch, width)) if feats.shape[0] == 1 else feats
        return ops.cast(feats, self.compute_dtype)

    def _coordinates(self, latents):
        """[B, h, w, 2]: x (left -1 .. right 1) and y (top -1 .. bottom 1) of each pixel."""
        shape = ops.shape(latents)
        b, h, w = shape[0], shape[1], shape[2]
        ys = ops.linspace(-1.0, 1.0, h)
        xs = ops.linspace(-1.0, 1.0, w)
        grid = ops.stack(
            [ops.broadcast_to(xs[None, :], (h, w)), ops.broadcast_to(ys[:, None], (h, w))], axis=-1
        )
        return ops.broadcast_to(ops.cast(grid, latents.dtype)[None], (b, h, w, 2))

    def build_weights(self):
        """Creates every variable with one small forward pass."""
        side = 2 ** len(self.block_out_channels)  # 2x2 at the lowest level: no softmax over one position
        cross = self.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        added = None
        if self.needs_added_cond:
            # any split of the projection input into text width + time ids builds the same weights
            n = 1
            added = {"text_embeds": ops.zeros((1, self.projection_class_embeddings_input_dim - n * self.addition_time_embed_dim)),
                     "time_ids": ops.zeros((1, n))}
        timestep_cond = None if self.time_cond_proj_dim is None else ops.zeros((1, self.time_cond_proj_dim))
        self(
            ops.zeros((1, side, side, self.in_channels)),
            ops.zeros((1,)),
            ops.zeros((1, 2, cross)),
            added,
            timestep_cond,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sample_size": self.sample_size,
                "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "down_block_types": self.down_block_types,
                "up_block_types": self.up_block_types,
                "block_out_channels": self.block_out_channels,
                "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups,
                "norm_eps": self.norm_eps,
                "cross_attention_dim": self.cross_attention_dim,
                "attention_head_dim": self.attention_head_dim,
                "num_attention_heads": self.num_attention_heads,
                "transformer_layers_per_block": self.transformer_layers_per_block,
                "use_linear_projection": self.use_linear_projection,
                "upcast_attention": self.upcast_attention,
                "flip_sin_to_cos": self.flip_sin_to_cos,
                "freq_shift": self.freq_shift,
                "addition_embed_type": self.addition_embed_type,
                "addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
                "time_cond_proj_dim": self.time_cond_proj_dim,
                "attention": self.attention,
                "coordinate_channels": self.coordinate_channels,
            }
        )
        return config
