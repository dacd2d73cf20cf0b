"""weights_port conversion: strictness, wrong architectures, hostile files, atomic output, CLI."""

import os

import numpy as np
import pytest

from support import tiny_models
from support.torch_format import hostile_command_file, save_torch_zip


def run_cli(args):
    from weights_port.__main__ import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return tiny_models.write_single_file("tiny-sd1", str(tmp_path_factory.mktemp("src") / "tiny1.safetensors"))


def test_ckpt_with_command_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.ckpt"
    hostile_command_file(str(src), "posix.system", str(marker))
    dst = tmp_path / "out"
    assert run_cli([src, dst, "--config", tiny_models.fixture_dir("tiny-sd1")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "Traceback" not in err
    assert not marker.exists(), "the pickle payload ran"
    assert not dst.exists() and os.listdir(tmp_path) == ["evil.ckpt"]


def test_architecture_mismatch_names_what_the_file_looks_like(sd1_file, tmp_path):
    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"looks like an SD1\.x checkpoint .* describes an SD2\.x"):
        convert_checkpoint(sd1_file, str(tmp_path / "x"), config=tiny_models.fixture_dir("tiny-sd2"))
    assert os.listdir(tmp_path) == []


def test_missing_vae_and_lora_files(tmp_path):
    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    tensors = tiny_models.original_state_dict("tiny-sd1")
    no_vae = {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}
    save_torch_zip(no_vae, str(tmp_path / "novae.ckpt"))
    with pytest.raises(CheckpointError, match="no VAE"):
        convert_checkpoint(str(tmp_path / "novae.ckpt"), str(tmp_path / "a"))
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), "float32")}
    save_torch_zip(lora, str(tmp_path / "lora.ckpt"))
    with pytest.raises(CheckpointError, match="LoRA"):
        convert_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == ["lora.ckpt", "novae.ckpt"]


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    tensors = tiny_models.original_state_dict("tiny-sd1")
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    missing = dict(tensors)
    del missing[key]
    save_torch_zip(missing, str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "a"), config=tiny_models.fixture_dir("tiny-sd1"))
    bad = dict(tensors)
    bad[key] = np.zeros((3, 3), "float32")
    save_torch_zip(bad, str(tmp_path / "bad.ckpt"))
    with pytest.raises(CheckpointError, match=r"middle_block\.1\.proj_out\.weight.*\(3, 3\)"):
        convert_checkpoint(str(tmp_path / "bad.ckpt"), str(tmp_path / "b"), config=tiny_models.fixture_dir("tiny-sd1"))
    extra = dict(tensors)
    extra["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = np.ones(4, "float32")
    save_torch_zip(extra, str(tmp_path / "extra.ckpt"))
    with pytest.raises(CheckpointError, match=r"fit no weight.*input_blocks\.99"):
        convert_checkpoint(str(tmp_path / "extra.ckpt"), str(tmp_path / "c"), config=tiny_models.fixture_dir("tiny-sd1"))
    assert sorted(os.listdir(tmp_path)) == ["bad.ckpt", "extra.ckpt", "missing.ckpt"]


def test_unused_entries_are_listed_and_float16_storage(sd1_file, tmp_path):
    import json

    from diffusion_tf.state_dict import read_weights
    from weights_port.convert import convert_checkpoint

    dst = convert_checkpoint(sd1_file, str(tmp_path / "m"), config=tiny_models.fixture_dir("tiny-sd1"),
                             dtype="float16", log=lambda *_: None)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert "alphas_cumprod" in config["unused_checkpoint_keys"]
    assert config["weights_dtype"] == "float16"
    assert all(v.dtype == np.float16 for v in read_weights(os.path.join(dst, "unet.weights.h5")).values())


def test_conversion_reports_progress_per_tensor(sd1_file, tmp_path):
    """Each component's assignment and writing is logged at every quarter of its tensors."""
    import re

    from diffusion_tf.state_dict import read_weights
    from weights_port.convert import convert_checkpoint

    lines = []
    dst = convert_checkpoint(sd1_file, str(tmp_path / "m"), config=tiny_models.fixture_dir("tiny-sd1"),
                             log=lines.append)
    for verb in ("assigning", "writing"):
        for component in ("text_encoder", "unet", "vae"):
            total = len(read_weights(os.path.join(dst, f"{component}.weights.h5")))
            counts = [
                (int(m.group(1)), int(m.group(2)), int(m.group(3)))
                for m in (re.fullmatch(rf"{verb} {component}: (\d+)/(\d+) tensors \((\d+)%\)", x) for x in lines)
                if m
            ]
            assert len(counts) == 4, (verb, component, lines)
            assert [c[1] for c in counts] == [total] * 4 and counts[-1][:1] == (total,) and counts[-1][2] == 100
            assert [c[0] for c in counts] == sorted(c[0] for c in counts)
    assert lines[-1] == f"wrote {dst}"


def test_destination_is_never_clobbered_or_half_written(sd1_file, tmp_path, monkeypatch):
    from diffusion_tf import model_folder
    from weights_port.convert import convert_checkpoint

    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint(sd1_file, str(dst), config=tiny_models.fixture_dir("tiny-sd1"))
    assert (dst / "keep.txt").read_text() == "old"

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffusion_tf.state_dict.save_weights", boom)
    with pytest.raises(OSError, match="No space"):
        convert_checkpoint(sd1_file, str(dst), config=tiny_models.fixture_dir("tiny-sd1"), overwrite=True,
                           log=lambda *_: None)
    assert (dst / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["m"], "a temporary folder was left behind"
    assert model_folder.FORMAT


@pytest.mark.slow  # builds the full-size SD 1.5 and 2.1 networks (~50 s)
def test_inferred_architecture_of_a_full_size_layout():
    """Shape inference on the real SD 1.5 / 2.1 key layouts (shapes only, no data)."""
    from diffusion_tf import presets
    from weights_port.convert import original_tables
    from weights_port.infer import infer_configs

    for name, family_heads in (("sd-v1-5", 8), ("sd-v2-1", [5, 10, 20, 20])):
        configs = presets.get_preset(name)["configs"]
        shapes = {}
        from diffusion_tf.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
        from diffusion_tf.state_dict import named_variables

        # Build variables lazily only to read shapes: use small spatial inputs.
        models = {"text_encoder": CLIPTextModel.from_config(configs["text_encoder"]),
                  "unet": UNet2DConditionModel.from_config(configs["unet"]),
                  "vae": AutoencoderKL.from_config(configs["vae"])}
        for m in models.values():
            m.build_weights()
        tables = original_tables(models, configs)
        for component, model in models.items():
            for key, (var, perm) in named_variables(model).items():
                shape = tuple(var.shape)
                shape = tuple(shape[p] for p in perm) if perm else shape
                source = tables[component][key]
                target = source.keys[0]
                if source.split is not None:
                    shape = (shape[0] * 3,) + shape[1:]
                shapes[target] = shape
        if name == "sd-v2-1":
            shapes["cond_stage_model.model.transformer.resblocks.23.ln_1.weight"] = (1024,)
        inferred = infer_configs(shapes)
        unet = inferred["unet"]
        assert unet["block_out_channels"] == configs["unet"]["block_out_channels"]
        assert unet["attention_head_dim"] == family_heads
        assert unet["cross_attention_dim"] == configs["unet"]["cross_attention_dim"]
        assert unet["use_linear_projection"] == configs["unet"]["use_linear_projection"]
        assert inferred["text_encoder"]["num_hidden_layers"] == configs["text_encoder"]["num_hidden_layers"]
        assert inferred["text_encoder"]["hidden_act"] == configs["text_encoder"]["hidden_act"]
        assert inferred["vae"]["block_out_channels"] == configs["vae"]["block_out_channels"]
        del models


def test_cli_help_and_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--prediction-type", "--dtype", "--overwrite"):
        assert option in out
    assert run_cli([tmp_path / "nothing.safetensors", tmp_path / "out"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert run_cli([tmp_path / "notes.txt", tmp_path / "out"]) == 2
    assert "unsupported checkpoint extension" in capsys.readouterr().err
    assert run_cli([tmp_path, tmp_path / "out"]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err


def test_configs_are_a_folder_or_a_dict_never_a_preset_name(sd1_file, tmp_path):
    from weights_port.convert import build_models, convert_checkpoint, folder_configs, given_configs
    from weights_port.errors import CheckpointError

    configs = folder_configs(tiny_models.fixture_dir("tiny-sd1"))
    given = given_configs(configs)
    assert given == configs and given["unet"] is not configs["unet"]  # fresh dicts
    partial = given_configs({c: configs[c] for c in ("text_encoder", "unet", "vae")})
    assert set(partial) == {"text_encoder", "unet", "vae", "scheduler", "tokenizer"}
    assert sorted(build_models(configs)) == ["text_encoder", "unet", "vae"]
    dst = convert_checkpoint(sd1_file, str(tmp_path / "m"), config=configs, log=lambda *_: None)
    assert sorted(os.listdir(dst)) == ["config.json", "text_encoder.weights.h5", "unet.weights.h5", "vae.weights.h5"]
    with pytest.raises(ValueError, match=r"config='sd-v1-5' is not a folder.*get_preset\(NAME\)\['configs'\]"):
        given_configs("sd-v1-5")
    with pytest.raises(ValueError, match=r"lacking unet.*with unknown extra.*allowed keys: text_encoder, text_encoder_2, unet, vae"):
        given_configs({"text_encoder": {}, "vae": {}, "extra": {}})
    with pytest.raises(ValueError, match=r"config=7 \(int\); must be a diffusers-style folder or a dict"):
        given_configs(7)
    with pytest.raises(CheckpointError, match="but the config dict describes an SD2.x"):
        convert_checkpoint(sd1_file, str(tmp_path / "x"), config=folder_configs(tiny_models.fixture_dir("tiny-sd2")))


def test_cli_looks_preset_names_up_for_the_converter(sd1_file, tmp_path, capsys):
    assert run_cli([sd1_file, tmp_path / "x", "--config", "sd-v2-1"]) == 2
    assert "looks like an SD1.x checkpoint" in (err := capsys.readouterr().err)
    assert "but --config 'sd-v2-1' describes an SD2.x model" in err
    assert run_cli([sd1_file, tmp_path / "x", "--config", "sd-v9"]) == 2
    assert "unknown preset 'sd-v9'; valid presets: sd-turbo, sd-v1-5, sd-v2-1, sd-v2-1-base" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
