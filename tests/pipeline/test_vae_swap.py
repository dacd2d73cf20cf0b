"""Text2Image(vae=...) / load_vae: another VAE decodes (and encodes) for the tiny SD 1.x model.

Parity (scripts/make_vae_fixtures.py): diffusers' StableDiffusionPipeline with
`pipe.vae = AutoencoderTiny(...)` (text-to-image, given latents; image-to-image, given noise)
and with `pipe.vae = AutoencoderKL.from_single_file(original-layout file)`, within 2/255. Then
every source gives the same VAE, the model's own comes back with vae=None, and every VAE that
does not fit is a ValueError naming the value and what is allowed, with the pipeline unchanged.
"""

import os

import numpy as np
import pytest

from support import tiny_models, vae_files

REF = vae_files.reference()
META = REF["meta"]
TINY = tiny_models.reference("tiny-sd1")

pytestmark = pytest.mark.xdist_group("tiny-sd1")  # the session's converted tiny-sd1 folder


def _shapes(config):
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import state_dict_shapes

    return state_dict_shapes(build_model("vae", config))


def _taesd(name, root, **change):
    """A diffusers AutoencoderTiny folder of fixture `name` (config changed by `change`)."""
    config = dict(vae_files.config(name), **change)
    if "decoder_block_out_channels" in change:
        config["block_out_channels"] = change["decoder_block_out_channels"]
    return vae_files.write_diffusers_folder(config, vae_files.weights(_shapes(config)), str(root))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    config = vae_files.config("tiny-taesd")
    state = vae_files.weights(_shapes(config))
    configs, _, _ = tiny_models.weights("tiny-sd1")
    kl_config = configs["vae"]
    kl_state = vae_files.weights(_shapes(kl_config), vae_files.KL_SEED)
    enc, dec = vae_files.write_original_taesd(state, str(root / "original"), ext=".pth")
    return {
        "taesd": vae_files.write_diffusers_folder(config, state, str(root / "taesd")),
        "taesd-decoder.pth": dec,
        "kl-file": vae_files.write_original_vae(kl_state, kl_config, str(root / "vae-ft-mse.safetensors")),
        "kl-fsm-file": vae_files.write_original_vae(kl_state, kl_config, str(root / "kl.ckpt"), "first_stage_model."),
        "kl-state": (kl_config, kl_state),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipe(tiny_folder, sources):
    from diffusion_tf import Text2Image

    pipe = Text2Image(model=tiny_folder, img_height=64, img_width=64, vae=sources["taesd"])
    yield pipe
    pipe.load_vae(None)


def _generate(pipe, **kw):
    args = dict(negative_prompt=META["negative"], num_steps=META["steps"], unconditional_guidance_scale=META["guidance"])
    args.update(kw)
    return pipe.generate(META["prompt"], **args)


def _diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_taesd_generation_equals_diffusers_pipe_vae_autoencoder_tiny(pipe, sources):
    pipe.load_vae(sources["taesd"])
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae_name == sources["taesd"]
    image = _generate(pipe, latents=TINY["gen_latents"])
    assert image.shape == REF["taesd_gen_image"].shape and image.dtype == np.uint8
    assert _diff(image, REF["taesd_gen_image"]) <= 2
    assert _diff(image, TINY["gen_image"]) > 20  # the model's own VAE draws another picture


@pytest.mark.heavy  # the generation above covers the decoder; this the encoder, in CI's second step
def test_taesd_image_to_image_equals_diffusers(pipe, sources):
    """StableDiffusionImg2ImgPipeline with pipe.vae = AutoencoderTiny: TAESD's encoder gives the
    latents themselves (times scaling_factor 1.0), nothing sampled."""
    with np.load(os.path.join(tiny_models.fixture_dir("tiny-sd1"), "editing.npz")) as f:
        image = f["image"]
    pipe.load_vae(sources["taesd"])
    out = _generate(pipe, init_image=image, strength=META["img2img_strength"], latents=REF["taesd_img2img_noise"],
                    paste_back=False)
    assert _diff(out, REF["taesd_img2img_image"]) <= 2


def test_kl_from_an_original_file_equals_diffusers_from_single_file(pipe, sources):
    label = pipe.load_vae(sources["kl-file"])
    assert label == sources["kl-file"] and pipe.vae.scaling_factor == 0.18215  # the model's: a file has none
    np.testing.assert_allclose(np.asarray(pipe.vae.decode(REF["kl_latents"])), REF["kl_decoded"], atol=1e-4)
    assert _diff(_generate(pipe, latents=TINY["gen_latents"]), REF["kl_gen_image"]) <= 2


def test_every_source_of_one_vae_decodes_alike(pipe, sources, tmp_path):
    from weights_port.vae import convert_vae

    folder = convert_vae(sources["taesd-decoder.pth"], str(tmp_path / "taesd-folder"), log=lambda *_: None)
    latents = REF["tiny-taesd_latents"]
    outputs = {}
    for label in ("taesd", "taesd-decoder.pth"):
        pipe.load_vae(sources[label])
        outputs[label] = np.asarray(pipe.decode(latents))
    pipe.load_vae(folder)
    outputs["vae folder"] = np.asarray(pipe.decode(latents))
    for label, out in outputs.items():
        np.testing.assert_array_equal(out, outputs["taesd"], err_msg=label)
    np.testing.assert_allclose(outputs["taesd"], REF["tiny-taesd_decoded"], atol=1e-4)
    for label in ("kl-file", "kl-fsm-file"):
        pipe.load_vae(sources[label])
        outputs[label] = np.asarray(pipe.decode(REF["kl_latents"]))
    np.testing.assert_array_equal(outputs["kl-file"], outputs["kl-fsm-file"])
    # a model folder lends its own VAE
    pipe.load_vae(tiny_models.converted_folder("tiny-sd1"))
    np.testing.assert_allclose(np.asarray(pipe.vae.decode(TINY["vae_latents"])), TINY["vae_decoded"], atol=1e-4)


def test_none_brings_the_models_own_vae_back(pipe, sources):
    """A swap releases the model's own VAE (as diffusers' `pipe.vae = ...`); None reads it from the
    model folder again, the same weights."""
    pipe.load_vae(None)
    own = [w.numpy() for w in pipe.vae.weights]
    pipe.load_vae(sources["taesd"])
    assert pipe.load_vae(None) is None and pipe.vae_name is None
    assert len(pipe.vae.weights) == len(own)
    for restored, original in zip(pipe.vae.weights, own):
        np.testing.assert_array_equal(restored.numpy(), original)
    assert _diff(_generate(pipe, latents=TINY["gen_latents"]), TINY["gen_image"]) <= 2


# ---------------------------------------------------------------- bad inputs
def _bad_sources(sources):
    """(source, message) pairs, each a VAE that does not fit tiny-sd1 (4 latent channels, factor 8,
    scaling factor 0.18215)."""
    root = sources["root"]
    kl_config, kl_state = sources["kl-state"]
    sdxl_vae = vae_files.write_diffusers_folder(dict(kl_config, scaling_factor=0.13025), kl_state,
                                                str(root / "sdxl-vae-fp16-fix"))
    wide_kl_config = dict(kl_config, latent_channels=16)
    wide_kl = vae_files.write_diffusers_folder(wide_kl_config, vae_files.weights(_shapes(wide_kl_config)),
                                               str(root / "kl16"))
    taesdxl = os.path.join(str(root), "taesdxl-folder")
    if not os.path.isdir(taesdxl):
        from weights_port.vae import convert_vae

        convert_vae(sources["taesd"], taesdxl, log=lambda *_: None, note={"for": ["sdxl"]})
    not_vae = str(root / "not-a-vae.safetensors")
    from safetensors.numpy import save_file

    save_file({"fc.weight": np.zeros((2, 2), "float32")}, not_vae)
    return [
        (_taesd("tiny-taesd", root / "taesd16", latent_channels=16),
         r"this AutoencoderTiny has 16 latent channels; the model's latents have 4 \(allowed: a VAE of 4 latent"),
        (wide_kl, r"this AutoencoderKL has 16 latent channels; the model's latents have 4"),
        (sdxl_vae, r"its scaling_factor is 0\.13025, the model's 0\.18215 \(allowed: 0\.18215\)"),
        (_taesd("tiny-taesd", root / "taesd-scaled", scaling_factor=0.5),
         r"an AutoencoderTiny with scaling_factor=0\.5; TAESD decodes the sampler's latents as they are \(allowed: 1\.0\)"),
        (_taesd("tiny-taesd", root / "taesd-f4", encoder_block_out_channels=[8] * 3, decoder_block_out_channels=[8] * 3,
                num_encoder_blocks=[1] * 3, num_decoder_blocks=[1] * 3),
         r"this AutoencoderTiny scales images down by 4, the model's VAE by 8 \(allowed: 8\)"),
        (taesdxl, r"is for SDXL models; this is an SD 1\.x/2\.x model \(allowed here: a VAE for SD 1\.x/2\.x, e\.g\. taesd\)"),
        (not_vae, r"not a VAE: none of the layouts"),
        (tiny_models.write_single_file("tiny-sd1", str(root / "whole.safetensors")), r"a whole Stable Diffusion checkpoint"),
        (str(root / "missing.safetensors"), r"vae='.*missing\.safetensors' is neither a folder, a file nor a VAE preset; "
                                            r"VAE presets: taesd, taesdxl"),
        ("taesd3", r"vae='taesd3' is neither a folder, a file nor a VAE preset"),
    ]


def test_a_vae_that_does_not_fit_is_refused_and_changes_nothing(pipe, sources):
    pipe.load_vae(sources["taesd"])
    vae, functions = pipe.vae, pipe._functions
    expected = np.asarray(pipe.decode(REF["tiny-taesd_latents"]))
    for source, message in _bad_sources(sources):
        with pytest.raises(ValueError, match=message):
            pipe.load_vae(source)
        assert pipe.vae is vae and pipe._functions is functions and pipe.vae_name == sources["taesd"], source
    np.testing.assert_array_equal(np.asarray(pipe.decode(REF["tiny-taesd_latents"])), expected)


def test_constructor_refuses_a_bad_vae(tiny_folder, sources):
    from diffusion_tf import Text2Image

    with pytest.raises(ValueError, match="16 latent channels"):
        Text2Image(model=tiny_folder, vae=_taesd("tiny-taesd", sources["root"] / "taesd16b", latent_channels=16))


def test_a_vae_preset_is_never_downloaded_unasked(pipe, tmp_path, monkeypatch):
    from diffusion_tf import runtime
    from diffusion_tf.presets import PresetUnavailableError

    vae = pipe.vae
    monkeypatch.setattr(pipe, "_download", False)
    with runtime.overridden(home=str(tmp_path)):
        with pytest.raises(PresetUnavailableError, match=r"(?s)preset 'taesd'.*download=False.*python -m weights_port "
                                                          r"--vae <downloaded file> .*vaes.taesd.*pass vae=<that folder>"):
            pipe.load_vae("taesd")
    assert pipe.vae is vae
    assert "downloads" not in os.listdir(tmp_path)
