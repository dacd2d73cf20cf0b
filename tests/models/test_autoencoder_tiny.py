"""AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny (scripts/make_vae_fixtures.py):
decode and encode within 1e-4 on the tiny random-weight configs (ReLU, SiLU, GELU, Mish) and on
the full-size TAESD config, whose keys and shapes are exactly diffusers'; then the config rules."""

import json

import numpy as np
import pytest

from support import vae_files
from support.parity import assert_close

REF = vae_files.reference()


def _build(config, **overrides):
    from diffusion_tf.models import AutoencoderTiny

    model = AutoencoderTiny.from_config(config, **overrides)
    model.build_weights()
    return model


def _with_random_weights(config):
    from diffusion_tf.state_dict import set_state_dict, state_dict_shapes

    model = _build(config)
    set_state_dict(model, vae_files.weights(state_dict_shapes(model)))
    return model


@pytest.mark.parametrize("name", vae_files.TAESD_NAMES)
def test_tiny_configs_decode_and_encode_as_diffusers(name):
    model = _with_random_weights(vae_files.config(name))
    assert_close(model.decode(REF[f"{name}_latents"]), REF[f"{name}_decoded"], f"{name} decode")
    assert_close(model.encode(REF[f"{name}_images"]), REF[f"{name}_encoded"], f"{name} encode")


def test_full_size_taesd_has_diffusers_keys_and_shapes_and_outputs():
    from diffusion_tf.state_dict import state_dict_shapes

    full = vae_files.full_size()
    model = _build(full["config"])
    assert state_dict_shapes(model) == full["shapes"]  # every key, every shape: 134 tensors
    assert len(full["shapes"]) == 134
    assert model.downsampling_factor == 8 and model.latent_channels == 4 and model.scaling_factor == 1.0
    model = _with_random_weights(full["config"])
    assert_close(model.decode(REF["full_latents"]), REF["full_decoded"], "full-size decode")
    assert_close(model.encode(REF["full_images"]), REF["full_encoded"], "full-size encode")


def test_decoder_clamps_its_input_and_maps_to_minus_one_one():
    """tanh(z / 3) * 3 first: latents far outside [-3, 3] all decode alike (saturated at +-3)."""
    model = _with_random_weights(vae_files.config("tiny-taesd"))
    z = REF["tiny-taesd_latents"]
    np.testing.assert_allclose(np.asarray(model.decode(np.sign(z) * 60.0)), np.asarray(model.decode(np.sign(z) * 90.0)),
                               atol=1e-5)
    assert not np.allclose(np.asarray(model.decode(z)), np.asarray(model.decode(2 * z)))


def test_config_round_trip_and_compiled_call():
    import tensorflow as tf

    from diffusion_tf.models import AutoencoderTiny

    model = _with_random_weights(vae_files.config("tiny-taesd-silu"))
    config = model.get_config()
    json.dumps(config)
    clone = AutoencoderTiny.from_config(config)
    clone.build_weights()
    clone.set_weights(model.get_weights())
    images = REF["tiny-taesd-silu_images"]
    np.testing.assert_array_equal(np.asarray(clone(images)), np.asarray(model(images)))
    compiled = tf.function(lambda x: model.decode(x), jit_compile=True)
    latents = REF["tiny-taesd-silu_latents"]
    np.testing.assert_allclose(np.asarray(compiled(latents)), np.asarray(model.decode(latents)), atol=1e-5)


def test_scale_latents_round_trip():
    model = _build(vae_files.config("tiny-taesd"))
    z = np.linspace(-2.9, 2.9, 24, dtype="float32").reshape(1, 2, 3, 4)
    scaled = np.asarray(model.scale_latents(z))
    assert scaled.min() >= 0 and scaled.max() <= 1
    np.testing.assert_allclose(np.asarray(model.unscale_latents(scaled)), z, atol=1e-6)
    assert np.asarray(model.scale_latents(np.full((1, 1, 1, 4), 10.0, "float32"))).max() == 1.0


BAD_CONFIGS = [
    (dict(encoder_block_out_channels=[8, 16, 16, 16]), r"encoder_block_out_channels=\[8, 16, 16, 16\] is not supported"),
    (dict(decoder_block_out_channels=[8, 8, 8]), r"decoder_block_out_channels=\[8, 8, 8\] must have one entry per level"),
    (dict(num_decoder_blocks=[1, 1, 1], decoder_block_out_channels=[8, 8, 8]),
     r"encoder downsamples by 8 .* decoder upsamples by 4"),
    (dict(upsampling_scaling_factor=4), r"decoder upsamples by 64"),
    (dict(upsampling_scaling_factor=1.5), r"upsampling_scaling_factor=1.5; must be an integer"),
    (dict(act_fn="tanh"), r"act_fn='tanh' is not supported; allowed: \['gelu', 'mish', 'relu', 'silu', 'swish'\]"),
    (dict(upsample_fn="bilinear"), r"upsample_fn='bilinear' is not supported"),
    (dict(shift_factor=0.1), r"shift_factor=0.1 is not supported"),
    (dict(block_out_channels=[16, 16, 16, 16]), r"block_out_channels=\[16, 16, 16, 16\] differs from decoder_block"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS, ids=[m[:30] for _, m in BAD_CONFIGS])
def test_unsupported_configs_name_the_field(change, message):
    from diffusion_tf.models import AutoencoderTiny

    base = {k: v for k, v in vae_files.config("tiny-taesd").items() if k != "block_out_channels"}
    with pytest.raises(ValueError, match=message):
        AutoencoderTiny.from_config(dict(base, **change))
