"""weights_port.vae: stand-alone VAEs (TAESD and AutoencoderKL) from every source layout, strictly.

Every source of the same random weights (tests/support/vae_files.py) gives the same network, and
that network reproduces diffusers (scripts/make_vae_fixtures.py: AutoencoderTiny, and
AutoencoderKL.from_single_file of the original-layout file) within 1e-4. Then every way a source
can be wrong: a missing, extra or misshapen tensor, half a TAESD pair, two pairs, a whole model, a
LoRA, something else; and the command line (`python -m weights_port --vae`).
"""

import json
import os

import numpy as np
import pytest

from support import tiny_models, vae_files
from support.parity import assert_close

REF = vae_files.reference()
TAESD = "tiny-taesd"


def _shapes(config):
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import state_dict_shapes

    return state_dict_shapes(build_model("vae", config))


@pytest.fixture(scope="module")
def taesd_state():
    config = dict(vae_files.config(TAESD))
    return config, vae_files.weights(_shapes(config))


@pytest.fixture(scope="module")
def kl_state():
    configs, _, _ = tiny_models.weights("tiny-sd1")
    config = configs["vae"]
    return config, vae_files.weights(_shapes(config), vae_files.KL_SEED)


@pytest.fixture(scope="module")
def taesd_sources(taesd_state, tmp_path_factory):
    """{layout label: source path} of the same tiny TAESD."""
    config, state = taesd_state
    root = tmp_path_factory.mktemp("taesd")
    folder = vae_files.write_diffusers_folder(config, state, str(root / "diffusers"))
    enc, dec = vae_files.write_original_taesd(state, str(root / "original"))
    pth_enc, pth_dec = vae_files.write_original_taesd(state, str(root / "original-pth"), ext=".pth")
    pipeline = root / "pipeline"
    vae_files.write_diffusers_folder(config, state, str(pipeline / "vae"))
    return {"diffusers folder": folder, "diffusers file": os.path.join(folder, "diffusion_pytorch_model.safetensors"),
            "pipeline folder": str(pipeline), "original encoder": enc, "original decoder": dec,
            "original folder": str(root / "original"), "original .pth": pth_dec, "original .pth encoder": pth_enc}


@pytest.fixture(scope="module")
def kl_sources(kl_state, tmp_path_factory):
    config, state = kl_state
    root = tmp_path_factory.mktemp("kl")
    return {
        "bare ldm": vae_files.write_original_vae(state, config, str(root / "vae-ft.safetensors")),
        "first_stage_model": vae_files.write_original_vae(state, config, str(root / "fsm.safetensors"),
                                                          "first_stage_model."),
        "ldm .ckpt": vae_files.write_original_vae(state, config, str(root / "vae.ckpt")),
        "diffusers file": vae_files.write_diffusers_folder(config, state, str(root / "diffusers")) + (
            "/diffusion_pytorch_model.safetensors"),
        "diffusers folder": str(root / "diffusers"),
    }


def _read(src, **kw):
    from weights_port.vae import read_vae

    return read_vae(src, **kw)


def _weights(model):
    from diffusion_tf.state_dict import get_state_dict

    return get_state_dict(model)


# ---------------------------------------------------------------- TAESD
LAYOUTS = {"diffusers folder": "diffusers", "diffusers file": "diffusers", "pipeline folder": "diffusers",
           "original encoder": "original", "original decoder": "original", "original folder": "original",
           "original .pth": "original", "original .pth encoder": "original"}


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_every_taesd_source_gives_diffusers_outputs(taesd_sources, taesd_state, label):
    section, model, details = _read(taesd_sources[label])
    assert details["class"] == "AutoencoderTiny" and details["layout"] == LAYOUTS[label] and details["unused"] == []
    assert section["_class_name"] == "AutoencoderTiny" and section["scaling_factor"] == 1.0
    ours = _weights(model)
    _, state = taesd_state
    assert sorted(ours) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(ours[key], state[key], err_msg=key)
    assert_close(model.decode(REF[f"{TAESD}_latents"]), REF[f"{TAESD}_decoded"], f"{label} decode")
    assert_close(model.encode(REF[f"{TAESD}_images"]), REF[f"{TAESD}_encoded"], f"{label} encode")


@pytest.mark.parametrize("name", vae_files.TAESD_NAMES[1:])
def test_architecture_read_from_original_files_keys(name, tmp_path):
    """Block counts per level and widths come from the entries; the activation (not in the weights)
    is taesd.py's ReLU, so a SiLU/GELU/Mish network's files read as ReLU ones: diffusers' folder
    config (or a given config) is what names another."""
    from weights_port import taesd_keys

    config = vae_files.config(name)
    state = vae_files.weights(_shapes(config))
    inferred = taesd_keys.infer_config({k: v.shape for k, v in state.items()})
    for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                "num_decoder_blocks", "latent_channels", "in_channels", "out_channels"):
        assert inferred[key] == config[key], key
    assert inferred["act_fn"] == "relu"
    enc, _ = vae_files.write_original_taesd(state, str(tmp_path))
    _, model, _ = _read(enc, config=dict(config, _class_name="AutoencoderTiny"))
    assert_close(model.decode(REF[f"{name}_latents"]), REF[f"{name}_decoded"], f"{name} decode (given config)")


def test_full_size_original_files_read_as_the_full_taesd(tmp_path):
    from diffusion_tf.state_dict import state_dict_shapes

    full = vae_files.full_size()
    state = vae_files.weights(full["shapes"])
    enc, dec = vae_files.write_original_taesd(state, str(tmp_path))
    section, model, _ = _read(dec)
    assert state_dict_shapes(model) == full["shapes"]
    for key in ("encoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks", "act_fn"):
        assert section[key] == full["config"][key], key
    assert_close(model.decode(REF["full_latents"]), REF["full_decoded"], "full-size decode from the original files")


def test_taesd_vae_folder_round_trip(taesd_sources, tmp_path):
    from diffusion_tf.components import load_vae_folder
    from weights_port.vae import convert_vae

    dst = convert_vae(taesd_sources["original folder"], str(tmp_path / "vae"), log=lambda *_: None)
    assert sorted(os.listdir(dst)) == ["config.json", "vae.weights.h5"]
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert config["format"] == "diffusion_tf.vae.v1" and config["source_layout"] == "original"
    section, model = load_vae_folder(dst)
    _, reference, _ = _read(taesd_sources["diffusers folder"])
    mine, theirs = _weights(model), _weights(reference)
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="already exists"):
        convert_vae(taesd_sources["original folder"], dst, log=lambda *_: None)


# ---------------------------------------------------------------- AutoencoderKL
@pytest.mark.parametrize("label", ["bare ldm", "first_stage_model", "ldm .ckpt", "diffusers file", "diffusers folder"])
def test_every_kl_source_equals_diffusers_from_single_file(kl_sources, kl_state, label):
    section, model, details = _read(kl_sources[label])
    assert details["class"] == "AutoencoderKL"
    # Only a diffusers folder records its scaling factor; a file's is the model's (None here).
    assert section["scaling_factor"] == (0.18215 if label == "diffusers folder" else None)
    _, state = kl_state
    ours = _weights(model)
    assert sorted(ours) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(ours[key], state[key], err_msg=key)
    assert_close(model.decode(REF["kl_latents"]), REF["kl_decoded"], f"{label} decode")
    assert_close(model.encode(REF["kl_images"]), REF["kl_encoded"], f"{label} encode")


def test_kl_training_file_entries_are_the_only_ones_left_unused(kl_state, tmp_path):
    from safetensors.numpy import save_file

    config, state = kl_state
    tensors = vae_files.original_vae(state, config)
    extra = {"loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4), "float32"),
             "model_ema.decay": np.array(0.9999, "float32"), "model_ema.num_updates": np.array(7, "int32")}
    save_file(dict(tensors, **extra), str(tmp_path / "train.safetensors"))
    _, _, details = _read(str(tmp_path / "train.safetensors"))
    assert details["unused"] == sorted(extra)
    save_file(dict(tensors, **{"encoder.extra.weight": np.zeros(3, "float32")}), str(tmp_path / "extra.safetensors"))
    from weights_port.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"1 tensors fit no weight of the AutoencoderKL.*encoder\.extra\.weight"):
        _read(str(tmp_path / "extra.safetensors"))


# ---------------------------------------------------------------- strictness
def _save(tensors, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return path


def test_missing_extra_and_misshapen_taesd_tensors_are_named(taesd_state, tmp_path):
    from weights_port.errors import CheckpointError
    from weights_port.taesd_keys import to_original

    _, state = taesd_state
    enc, dec = to_original(state)
    _save(enc, str(tmp_path / "taesd_encoder.safetensors"))
    missing = dict(dec)
    del missing["3.conv.2.bias"]
    _save(missing, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 weights not found.*decoder\.layers\.2\.conv\.2\.bias \(from decoder"
                                              r"\.layers\.2\.conv\.2\.bias\)"):
        _read(str(tmp_path / "taesd_decoder.safetensors"))
    _save(dict(dec, **{"3.skip.weight": np.zeros((8, 8, 1, 1), "float32")}), str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensors fit no weight of the AutoencoderTiny.*decoder\.layers\.2\.skip"):
        _read(str(tmp_path / "taesd_decoder.safetensors"))
    bad = dict(dec)
    bad["3.conv.0.weight"] = np.zeros((8, 8, 5, 5), "float32")
    _save(bad, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.2\.conv\.0\.weight: checkpoint shape \(8, 8, 5, 5\) "
                                              r"does not fit expected \(8, 8, 3, 3\)"):
        _read(str(tmp_path / "taesd_decoder.safetensors"))
    # the encoder's latents and the decoder's input of different widths
    wide = dict(dec)
    wide["1.weight"] = np.zeros((8, 16, 3, 3), "float32")
    _save(wide, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.weight: checkpoint shape \(8, 16, 3, 3\)"):
        _read(str(tmp_path / "taesd_decoder.safetensors"))


def test_half_a_pair_two_pairs_and_swapped_halves(taesd_state, tmp_path):
    from weights_port.errors import CheckpointError
    from weights_port.taesd_keys import to_original

    _, state = taesd_state
    enc, dec = to_original(state)
    alone = tmp_path / "alone"
    alone.mkdir()
    _save(dec, str(alone / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"taesd_encoder\.safetensors \(the encoder\) is missing; both are needed"):
        _read(str(alone / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match="not a VAE folder: no config.json .* and no taesd_encoder"):
        _read(str(alone))
    two = tmp_path / "two"
    two.mkdir()
    for prefix in ("taesd_", "taesdxl_"):
        _save(enc, str(two / f"{prefix}encoder.safetensors"))
        _save(dec, str(two / f"{prefix}decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds 2 TAESD pairs \(taesd_encoder/decoder, taesdxl_encoder/decoder\)"):
        _read(str(two))
    _read(str(two / "taesdxl_decoder.safetensors"))  # a file chooses its pair
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    _save(dec, str(swapped / "taesd_encoder.safetensors"))
    _save(enc, str(swapped / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match=r"taesd_encoder\.safetensors: holds a TAESD decoder"):
        _read(str(swapped))
    nameless = tmp_path / "weights.safetensors"
    _save(dec, str(nameless))
    with pytest.raises(CheckpointError, match="neither 'encoder' nor 'decoder'"):
        _read(str(nameless))


def test_files_that_are_not_vaes_are_refused_by_what_they_are(tmp_path):
    from weights_port.errors import CheckpointError

    whole = tiny_models.write_single_file("tiny-sd1", str(tmp_path / "sd1.safetensors"))
    with pytest.raises(CheckpointError, match="a whole Stable Diffusion checkpoint .* not a stand-alone VAE"):
        _read(whole)
    lora = _save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), "float32")},
                 str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="a LoRA file"):
        _read(lora)
    other = _save({"fc.weight": np.zeros((2, 2), "float32")}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a VAE: none of the layouts .* \(first keys: \['fc\.weight'\]\)"):
        _read(other)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        _read(str(tmp_path / "missing.safetensors"))
    unet_dir = tmp_path / "unet-folder"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="not a VAE folder"):
        _read(str(unet_dir))
    vae_dir = tmp_path / "pipe"
    (vae_dir / "vae").mkdir(parents=True)
    (vae_dir / "vae" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(CheckpointError, match=r"_class_name='VQModel'; a VAE folder's is one of AutoencoderKL, "
                                              r"AutoencoderTiny"):
        _read(str(vae_dir))


def test_a_16_channel_vae_without_quant_convs_is_refused_with_its_keys(kl_state, tmp_path):
    """SD3/FLUX VAEs have no quant_conv/post_quant_conv: the SD AutoencoderKL cannot hold them."""
    from weights_port.errors import CheckpointError

    config, state = kl_state
    tensors = {k: v for k, v in vae_files.original_vae(state, config).items() if "quant_conv" not in k}
    with pytest.raises(CheckpointError, match=r"missing 'post_quant_conv\.weight'"):
        _read(_save(tensors, str(tmp_path / "flux-like.safetensors")))


# ---------------------------------------------------------------- command line
def run_cli(argv):
    from weights_port.__main__ import main

    return main([str(a) for a in argv])


def test_cli_converts_a_vae_and_refuses_model_options(taesd_sources, kl_sources, tmp_path, capsys):
    from diffusion_tf.components import load_vae_folder

    assert run_cli(["--vae", taesd_sources["original folder"], tmp_path / "taesd"]) == 0
    section, model = load_vae_folder(str(tmp_path / "taesd"))
    assert section["_class_name"] == "AutoencoderTiny"
    assert run_cli(["--vae", kl_sources["bare ldm"], tmp_path / "kl", "--dtype", "float16"]) == 0
    with open(tmp_path / "kl" / "config.json") as f:
        config = json.load(f)
    assert config["vae"]["scaling_factor"] is None and config["weights_dtype"] == "float16"
    capsys.readouterr()
    assert run_cli(["--vae", kl_sources["bare ldm"], tmp_path / "x", "--config", "sd-v1-5"]) == 2
    assert "--config and --prediction-type describe a whole model" in capsys.readouterr().err
    assert run_cli(["--vae", tmp_path / "nothing.safetensors", tmp_path / "y"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_the_model_converter_points_a_vae_to_the_vae_flag(taesd_sources, kl_sources, tmp_path, capsys):
    for src, kind in ((taesd_sources["original decoder"], "TAESD"), (kl_sources["bare ldm"], "AutoencoderKL")):
        assert run_cli([src, tmp_path / "m"]) == 2
        err = capsys.readouterr().err
        assert f"is a stand-alone VAE ({kind}), not a whole model" in err and "--vae" in err
    assert run_cli([taesd_sources["diffusers folder"], tmp_path / "m"]) == 2
    assert "a stand-alone VAE folder converts with `python -m weights_port --vae" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")
