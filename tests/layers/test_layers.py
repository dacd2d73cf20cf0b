"""Layers and models: config round trip, eager vs compiled, dtypes, LinearAttention maths."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from diffusion_tf.layers import Attention, LinearAttention, ResnetBlock2D, Transformer2D
from diffusion_tf.layers.sampling import Downsample2D, Upsample2D, resize_nearest
from diffusion_tf.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from diffusion_tf.state_dict import named_variables

TINY_UNET = dict(
    sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16, attention_head_dim=4,
)


def run_layer_test(cls, init_kwargs, inputs, expected_shape, call_kwargs=None):
    """keras-hub style: build, round-trip get_config, eager == compiled, dtype, shape."""
    call_kwargs = call_kwargs or {}
    layer = cls(**init_kwargs)
    out = layer(*inputs, **call_kwargs)
    assert tuple(out.shape) == expected_shape
    assert out.dtype == "float32"
    config = layer.get_config()
    json.dumps(config)  # serialisable
    clone = cls.from_config(config) if hasattr(cls, "from_config") else cls(**config)
    clone(*inputs, **call_kwargs)
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in layer.weights]
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(*inputs, **call_kwargs)), np.asarray(out), atol=1e-6)
    compiled = tf.function(lambda *a: layer(*a, **call_kwargs), jit_compile=True)
    np.testing.assert_allclose(np.asarray(compiled(*inputs)), np.asarray(out), atol=1e-4)
    return layer, out


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def test_attention_and_linear_attention_share_weights():
    x = rand(2, 10, 16)
    std, out = run_layer_test(Attention, dict(query_dim=16, heads=2, dim_head=8), [x], (2, 10, 16))
    lin = LinearAttention(16, 2, 8)
    lin(x)
    assert list(named_variables(lin)) == list(named_variables(std))
    lin.set_weights(std.get_weights())
    assert not np.allclose(np.asarray(lin(x)), np.asarray(out))


def test_linear_attention_matches_numpy_reference():
    x, ctx = rand(1, 12, 16), rand(1, 12, 16, seed=1)
    layer = LinearAttention(16, 2, 8)
    out = np.asarray(layer(x))
    from diffusion_tf.state_dict import get_state_dict

    W = get_state_dict(layer)  # PyTorch layout: weight [out, in]

    def softmax(a, axis):
        e = np.exp(a - a.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    q = (x @ W["to_q.weight"].T).reshape(1, 12, 2, 8)
    k = (x @ W["to_k.weight"].T).reshape(1, 12, 2, 8)
    v = (x @ W["to_v.weight"].T).reshape(1, 12, 2, 8)
    q, k = softmax(q, -1), softmax(k, 1)  # features / positions
    context = np.einsum("bnhd,bnhe->bhde", k, v)  # [B, H, D, D]: no N x N matrix
    ref = np.einsum("bnhd,bhde->bnhe", q, context).reshape(1, 12, 16)
    ref = ref @ W["to_out.0.weight"].T + W["to_out.0.bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_linear_attention_cost_is_linear_in_tokens():
    # 16k tokens: a softmax attention matrix would be 16k x 16k x 2 heads (2 GB); linear needs D x D.
    x = tf.random.normal((1, 16384, 16))
    out = LinearAttention(16, 2, 8)(x)
    assert tuple(out.shape) == (1, 16384, 16)


def test_resnet_block_and_transformer():
    x, temb, ctx = rand(2, 8, 8, 32), rand(2, 64), rand(2, 5, 16)
    run_layer_test(ResnetBlock2D, dict(in_channels=32, out_channels=64, temb_channels=64), [x, temb], (2, 8, 8, 64))
    for linear in (False, True):
        run_layer_test(
            Transformer2D, dict(channels=32, heads=4, cross_attention_dim=16, use_linear_projection=linear),
            [x, ctx], (2, 8, 8, 32),
        )


def test_sampling_layers_match_pytorch_rules():
    x = rand(1, 7, 5, 4)
    assert tuple(Downsample2D(4)(x).shape) == (1, 4, 3, 4)  # ceil(n / 2) with padding 1
    assert tuple(Downsample2D(4, "asymmetric")(rand(1, 8, 8, 4)).shape) == (1, 4, 4, 4)
    assert tuple(Upsample2D(4)(x, size=(13, 9)).shape) == (1, 13, 9, 4)
    up = np.asarray(resize_nearest(x, (14, 10)))
    np.testing.assert_array_equal(up, x.repeat(2, axis=1).repeat(2, axis=2))
    odd = np.asarray(resize_nearest(x, (13, 9)))
    rows = np.floor(np.arange(13) * 7 / 13).astype(int)
    cols = np.floor(np.arange(9) * 5 / 9).astype(int)
    np.testing.assert_array_equal(odd, x[:, rows][:, :, cols])


def test_unet_config_round_trip_and_attention_types():
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.build_weights()
    config = unet.get_config()
    clone = UNet2DConditionModel.from_config(config)
    clone.build_weights()
    assert list(named_variables(clone)) == list(named_variables(unet))
    linear = UNet2DConditionModel.from_config(config, attention="linear")
    linear.build_weights()
    assert list(named_variables(linear)) == list(named_variables(unet))
    linear.set_weights(unet.get_weights())
    x, t, ctx = rand(1, 8, 8, 4), np.array([500]), rand(1, 7, 16)
    a, b = np.asarray(unet(x, t, ctx)), np.asarray(linear(x, t, ctx))
    assert a.shape == b.shape == (1, 8, 8, 4) and not np.allclose(a, b)
    compiled = tf.function(lambda *args: unet(*args), jit_compile=True)
    np.testing.assert_allclose(np.asarray(compiled(x, t, ctx)), a, atol=1e-4)


def test_unet_odd_latent_sizes_follow_skip_shapes():
    unet = UNet2DConditionModel(**TINY_UNET)
    out = unet(rand(1, 9, 7, 4), np.array([1]), rand(1, 3, 16))
    assert tuple(out.shape) == (1, 9, 7, 4)


def test_inpainting_unet_has_nine_input_channels():
    unet = UNet2DConditionModel(**dict(TINY_UNET, in_channels=9))
    unet.build_weights()
    assert tuple(named_variables(unet)["conv_in.weight"][0].shape) == (3, 3, 9, 32)


def test_coordinate_channels_give_the_unet_absolute_position():
    unet = UNet2DConditionModel(**dict(TINY_UNET, coordinate_channels=True))
    unet.build_weights()
    kernel = named_variables(unet)["conv_in.weight"][0]
    assert tuple(kernel.shape) == (3, 3, 4 + 2, 32)
    clone = UNet2DConditionModel.from_config(unet.get_config())
    clone.build_weights()
    clone.set_weights(unet.get_weights())
    coords = np.asarray(unet._coordinates(np.zeros((2, 5, 3, 4), "float32")))
    np.testing.assert_allclose(coords[1, :, :, 0], [[-1, 0, 1]] * 5)  # x: left -> right
    np.testing.assert_allclose(coords[1, :, 0, 1], [-1, -0.5, 0, 0.5, 1])  # y: top -> bottom
    # Cutting conv_in's coordinate inputs changes the output away from the borders too,
    # where zero padding gives no position signal.
    x, t, ctx = np.full((1, 8, 8, 4), 0.3, "float32"), np.array([500]), rand(1, 7, 16)
    out = np.asarray(clone(x, t, ctx))
    np.testing.assert_allclose(out, np.asarray(unet(x, t, ctx)), atol=1e-6)
    w = kernel.numpy()
    w[:, :, 4:] = 0
    kernel.assign(w)
    flat = np.asarray(unet(x, t, ctx))
    interior = (slice(None), slice(3, 5), slice(3, 5))  # away from the zero padding
    assert np.abs(out[interior] - flat[interior]).max() > 1e-3


def test_model_dtype_policy_reaches_every_layer():
    unet = UNet2DConditionModel(**TINY_UNET, dtype="mixed_bfloat16")
    out = unet(rand(1, 8, 8, 4), np.array([1]), rand(1, 3, 16))
    assert out.dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in unet.weights)


@pytest.mark.parametrize(
    "cls,config,needle",
    [
        (UNet2DConditionModel, dict(TINY_UNET, down_block_types=["Foo", "DownBlock2D"]), "down_block_types"),
        (UNet2DConditionModel, dict(TINY_UNET, attention_head_dim=[1, 2, 3]), "attention_head_dim"),
        (UNet2DConditionModel, dict(TINY_UNET, attention="flash"), "attention='flash'"),
        (UNet2DConditionModel, dict(TINY_UNET, class_embed_type="timestep"), "class_embed_type"),
        (CLIPTextModel, dict(hidden_act="relu6"), "relu6"),
        (AutoencoderKL, dict(down_block_types=["DownBlock2D"]), "down_block_types"),
    ],
)
def test_unsupported_configs_are_refused(cls, config, needle):
    with pytest.raises(ValueError, match=needle):
        cls.from_config(config)


def test_clip_and_vae_round_trip():
    clip = CLIPTextModel(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12)
    ids = np.arange(12)[None].astype("int32")
    out = np.asarray(clip(ids))
    clone = CLIPTextModel.from_config(clip.get_config())
    clone(ids)
    clone.set_weights(clip.get_weights())
    np.testing.assert_allclose(np.asarray(clone(ids)), out, atol=1e-6)
    # causal: changing the last token does not change earlier positions
    ids2 = ids.copy()
    ids2[0, -1] = 5
    np.testing.assert_allclose(np.asarray(clip(ids2))[0, :-1], out[0, :-1], atol=1e-6)
    vae = AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1)
    assert tuple(vae(rand(1, 16, 16, 3)).shape) == (1, 16, 16, 3)
    assert vae.downsampling_factor == 2
    keras.backend.clear_session()


def test_chunked_attention_equals_whole_attention():
    """Queries processed in chunks (a long sequence) give the numbers of one score matrix."""
    from keras import ops

    from diffusion_tf.layers import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 100, 3, 8)).astype("float32") for _ in range(3))
    whole = ops.convert_to_numpy(attention.scaled_dot_product_attention(q, k, v, 8**-0.5))
    budget = 100 * 4 * 7  # 7 queries of one head per iteration: 15 chunks, the last one short
    assert attention._query_chunk(2, 3, 100, 100, budget) == 7
    import tensorflow as tf

    def chunked(q, k, v):
        return attention.scaled_dot_product_attention(q, k, v, 8**-0.5, max_score_bytes=budget)

    # eager, and a while loop over the chunks in a graph and under XLA (one chunk's scores alive at a time)
    for fn in (chunked, tf.function(chunked), tf.function(chunked, jit_compile=True)):
        out = ops.convert_to_numpy(fn(q, k, v))
        np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)  # matmul blocking: rounding only
    assert attention._query_chunk(2, 8, 16384, 16384, attention.MAX_SCORE_BYTES) * 16384 * 4 <= 2**28
    assert attention._query_chunk(2, 8, 64, 77, attention.MAX_SCORE_BYTES) is None  # small: one matrix
    # cache-sized blocks for speed, one head at a time: SD at 256 px (1024 tokens) all queries of a head,
    # 512 px in chunks of 256; a 16x16 map (256 tokens, 4 MiB of scores for all heads) stays one matrix
    assert attention._query_chunk(2, 8, 1024, 1024, attention.MAX_SCORE_BYTES) == 1024
    assert attention._query_chunk(2, 8, 4096, 4096, attention.MAX_SCORE_BYTES) == 256
    assert attention._query_chunk(2, 8, 256, 256, attention.MAX_SCORE_BYTES) is None
