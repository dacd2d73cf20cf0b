"""CLIPTextModel: the CLIP text transformer whose last hidden state conditions the UNet."""

import keras
from keras import ops

from diffusion_tf.layers.attention import scaled_dot_product_attention
from diffusion_tf.layers.ops_util import dense, get_activation, layer_norm
from diffusion_tf.models.config_util import from_config
from diffusion_tf.layers.base import Layer, Model


class CLIPAttention(Layer):
    """Causal multi-head self-attention with q_proj / k_proj / v_proj / out_proj."""

    def __init__(self, hidden_size, num_heads, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.q_proj = dense(hidden_size, "q_proj", policy)
        self.k_proj = dense(hidden_size, "k_proj", policy)
        self.v_proj = dense(hidden_size, "v_proj", policy)
        self.out_proj = dense(hidden_size, "out_proj", policy)
        self.hidden_size = hidden_size
        self.num_heads = num_heads

    def call(self, x, mask):
        b, n = ops.shape(x)[0], ops.shape(x)[1]
        head_dim = self.hidden_size // self.num_heads
        split = lambda t: ops.reshape(t, (b, n, self.num_heads, head_dim))  # noqa: E731
        out = scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            head_dim**-0.5, mask,
        )
        return self.out_proj(ops.reshape(out, (b, n, self.hidden_size)))

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_size": self.hidden_size, "num_heads": self.num_heads})
        return config


class CLIPMLP(Layer):
    def __init__(self, hidden_size, intermediate_size, hidden_act, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = dense(intermediate_size, "fc1", self.dtype_policy)
        self.fc2 = dense(hidden_size, "fc2", self.dtype_policy)
        self.activation = get_activation(hidden_act)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act

    def call(self, x):
        return self.fc2(self.activation(self.fc1(x)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "hidden_act": self.hidden_act,
            }
        )
        return config


class CLIPEncoderLayer(Layer):
    def __init__(self, hidden_size, intermediate_size, num_heads, hidden_act, eps, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.layer_norm1 = layer_norm(eps, "layer_norm1", policy)
        self.self_attn = CLIPAttention(hidden_size, num_heads, name="self_attn", dtype=policy)
        self.layer_norm2 = layer_norm(eps, "layer_norm2", policy)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act, name="mlp", dtype=policy)
        self.config = dict(
            hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_heads=num_heads, hidden_act=hidden_act, eps=eps,
        )

    def call(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))

    def get_config(self):
        config = super().get_config()
        config.update(self.config)
        return config


class _Container(Layer):
    """A weightless node of the key tree (`text_model`, `embeddings`, `encoder`)."""


class CLIPTextModel(Model):
    """Token ids [B, T] -> last hidden state [B, T, hidden_size] (after final_layer_norm).

    Arguments are the fields of transformers' `CLIPTextConfig`. SD 1.x uses 12
    layers with quick_gelu; SD 2.x's OpenCLIP ViT-H text tower is stored with 23
    of its 24 layers (it conditions on the penultimate layer) and gelu.

    `projection_dim` (an int) makes it transformers' `CLIPTextModelWithProjection` (SDXL's
    second encoder, OpenCLIP bigG): `text_projection` (no bias) maps the final-normed hidden
    state at the end-of-text token to the pooled embedding, `call(..., pooled=True)`. Where that
    token is follows transformers: `eos_token_id == 2` (the configs written before transformers
    fixed it, SDXL's among them) takes the position of the largest id, else the first position of
    `eos_token_id`. `from_config` keeps a config's `projection_dim` only with
    `with_projection=True` (every transformers CLIP config has one, used or not).
    """

    def __init__(
        self,
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=None,
        eos_token_id=2,
        **kwargs,
    ):
        get_activation(hidden_act)
        super().__init__(**kwargs)
        policy = self.dtype_policy

        # === Layers ===  (attribute names follow the checkpoint keys)
        self.text_model = _Container(name="text_model", dtype=policy)
        tm = self.text_model
        tm.embeddings = _Container(name="embeddings", dtype=policy)
        tm.embeddings.token_embedding = keras.layers.Embedding(
            vocab_size, hidden_size, name="token_embedding", dtype=policy
        )
        tm.embeddings.position_embedding = keras.layers.Embedding(
            max_position_embeddings, hidden_size, name="position_embedding", dtype=policy
        )
        tm.encoder = _Container(name="encoder", dtype=policy)
        tm.encoder.layers = [
            CLIPEncoderLayer(
                hidden_size, intermediate_size, num_attention_heads, hidden_act,
                layer_norm_eps, name=f"layers_{i}", dtype=policy,
            )
            for i in range(num_hidden_layers)
        ]
        tm.final_layer_norm = layer_norm(layer_norm_eps, "final_layer_norm", policy)
        self.text_projection = (None if projection_dim is None
                                else dense(projection_dim, "text_projection", policy, use_bias=False))

        # === Config ===
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.projection_dim = projection_dim
        self.eos_token_id = eos_token_id

    @classmethod
    def from_config(cls, config, with_projection=False, **overrides):
        config = dict(config)
        if not with_projection:
            config.pop("projection_dim", None)
        elif not config.get("projection_dim"):
            raise ValueError(f"a CLIPTextModelWithProjection config needs projection_dim; got {config.get('projection_dim')!r}.")
        return from_config(cls, config, **overrides)

    def call(self, token_ids, extra_embeddings=None, clip_skip=0, final_norm=True, pooled=False):
        """`extra_embeddings` [E, hidden_size]: the vectors of ids vocab_size .. vocab_size + E - 1
        (textual-inversion tokens; the checkpoint's table stays as it is). `clip_skip`: condition
        on the output of layer n - clip_skip, through the final layer norm, as diffusers' clip_skip
        (0: the last layer; 1: the penultimate, A1111's "Clip skip: 2"). `final_norm=False`: that
        layer's output as it is (transformers' `hidden_states[-(clip_skip + 1)]`, what SDXL
        conditions on). `pooled=True` (a model with `projection_dim`): returns (hidden, pooled
        [B, projection_dim]), the pooled one always from the last layer."""
        tm = self.text_model
        n = token_ids.shape[1]
        positions = ops.arange(n)[None, :]
        x = self._token_embeddings(token_ids, extra_embeddings) + tm.embeddings.position_embedding(positions)
        causal = ops.triu(ops.full((n, n), -1e9, dtype="float32"), k=1)[None, None]
        layers = tm.encoder.layers
        keep = len(layers) - clip_skip
        hidden = x
        for i, layer in enumerate(layers[: len(layers) if pooled else keep]):
            x = layer(x, causal)
            if i == keep - 1:
                hidden = x
        out = tm.final_layer_norm(hidden) if final_norm else hidden
        if not pooled:
            return out
        if self.text_projection is None:
            raise ValueError("pooled=True needs a text encoder with a projection (projection_dim).")
        last = tm.final_layer_norm(x)
        ids = ops.cast(token_ids, "int32")
        where = ops.argmax(ids if self.eos_token_id == 2 else ops.cast(ops.equal(ids, self.eos_token_id), "int32"),
                           axis=-1)
        pick = ops.one_hot(where, n, dtype=last.dtype)[..., None]  # an exact gather: x * 1 plus zeros
        end = ops.sum(last * pick, axis=1)
        return out, self.text_projection(end)

    def _token_embeddings(self, token_ids, extra):
        table = self.text_model.embeddings.token_embedding
        if extra is None:
            return table(token_ids)
        # Two exact gathers and a select: a vocabulary id reads the checkpoint's table, an added
        # id its extra row (no concatenated copy of the 49408-row table per call).
        added = token_ids >= self.vocab_size
        own = table(ops.where(added, 0, token_ids))
        rows = ops.take(ops.cast(extra, own.dtype), ops.maximum(token_ids - self.vocab_size, 0), axis=0)
        return ops.where(added[..., None], rows, own)

    def build_weights(self):
        self(ops.zeros((1, self.max_position_embeddings), dtype="int32"), pooled=self.text_projection is not None)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps,
                "projection_dim": self.projection_dim,
                "eos_token_id": self.eos_token_id,
            }
        )
        return config
