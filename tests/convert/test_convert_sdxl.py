"""SDXL single files in Stability's SGM layout (sd_xl_base_1.0 / sd_xl_refiner_1.0 .safetensors, .ckpt).

The tiny SDXL models (base, refiner, 9-channel inpainting) are written both as diffusers folders and
as SGM single files (support.tiny_models); both conversions must give the same weights bit for bit
and the same config. Architecture inference is checked on the tiny files and on the key shapes of
the real full-size files (tests/fixtures/sdxl-shapes, from scripts/make_sdxl_shapes.py) against the
official diffusers configs. A live test lets diffusers' own from_single_file read the same tiny file.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from support import tiny_models

pytestmark = pytest.mark.xdist_group("sdxl-convert")  # one worker builds the module's conversions once

SHAPES = os.path.join(tiny_models.FIXTURES, "sdxl-shapes")
FULL_SIZE = ("sd_xl_base_1.0", "sd_xl_refiner_1.0")
QUIET = dict(log=lambda *_: None)


def run_cli(args):
    from weights_port.__main__ import main

    return main([str(a) for a in args])


def _config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _weights(folder):
    from diffusion_tf.state_dict import read_weights

    return {f[: -len(".weights.h5")]: read_weights(os.path.join(folder, f))
            for f in sorted(os.listdir(folder)) if f.endswith(".weights.h5")}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for component in wa:
        assert sorted(wa[component]) == sorted(wb[component]), component
        for key, value in wa[component].items():
            assert value.dtype == wb[component][key].dtype and np.array_equal(value, wb[component][key]), (
                component, key)


def _shapes(tensors):
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: (diffusers-folder conversion, SGM .safetensors conversion, the .safetensors path)}."""
    from weights_port.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("sdxl")

    class Converted(dict):
        """Built on first use: the default run needs the base and the refiner, not the inpainting model."""

        def __missing__(self, name):
            folder = tiny_models.write_diffusers_folder(name, str(root / f"{name}-diffusers"))
            single = tiny_models.write_single_file(name, str(root / f"{name}.safetensors"))
            a = convert_checkpoint(folder, str(root / f"{name}-from-folder"), **QUIET)
            b = convert_checkpoint(single, str(root / f"{name}-from-sgm"), config=tiny_models.fixture_dir(name),
                                   **QUIET)
            self[name] = (a, b, single)
            return self[name]

    return Converted()


# The default run checks the base and the refiner; the inpainting model with the heavy checks.
NAMES = [n if n != "tiny-sdxl-inpaint" else pytest.param(n, marks=pytest.mark.heavy) for n in tiny_models.SDXL_NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_sgm_file_converts_like_the_diffusers_folder(converted, name):
    from_folder, from_sgm, _ = converted[name]
    _assert_same_weights(from_folder, from_sgm)
    a, b = _config(from_folder), _config(from_sgm)
    assert b["source"] == f"{name}.safetensors"
    unused = {"tiny-sdxl-refiner": ["conditioner.embedders.0.model.logit_scale"]}.get(name, [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale"])
    assert b["unused_checkpoint_keys"] == unused
    for c in (a, b):
        del c["source"], c["unused_checkpoint_keys"]
    assert a == b
    expected = {"unet", "vae", "text_encoder_2"} | ({"text_encoder"} if name != "tiny-sdxl-refiner" else set())
    assert set(_weights(from_sgm)) == expected


def test_ckpt_with_inferred_architecture_via_the_cli(converted, tmp_path):
    """The refiner as a .ckpt (state_dict-wrapped pickle), no --config: the weights are those of
    the folder conversion; only what shapes cannot tell (head counts, sample size) differs."""
    name = "tiny-sdxl-refiner"
    ckpt = tiny_models.write_single_file(name, str(tmp_path / "refiner.ckpt"))
    assert run_cli([ckpt, tmp_path / "m"]) == 0
    from_folder = converted[name][0]
    _assert_same_weights(from_folder, str(tmp_path / "m"))
    a, b = _config(from_folder), _config(str(tmp_path / "m"))
    assert a["unet"].pop("attention_head_dim") == [2, 4, 4, 8] and b["unet"].pop("attention_head_dim") == [1] * 4
    assert (a["unet"].pop("sample_size"), b["unet"].pop("sample_size")) == (8, 128)
    assert (a["unet"].pop("upcast_attention"), b["unet"].pop("upcast_attention")) == (False, None)
    assert (a["vae"].pop("sample_size"), b["vae"].pop("sample_size")) == (64, 1024)
    assert a["text_encoder_2"].pop("num_attention_heads") == 4 and b["text_encoder_2"].pop("num_attention_heads") == 1
    for section in ("unet", "vae", "text_encoder_2", "tokenizer_2", "pipeline"):
        assert a[section] == b[section], section
    assert b["scheduler"] == a["scheduler"]


# ---------------------------------------------------------------- inference from key shapes
SHAPE_FIELDS = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection",
             "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"),
    "vae": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "down_block_types", "up_block_types"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings", "hidden_act"),
    "text_encoder_2": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "max_position_embeddings", "hidden_act", "projection_dim", "eos_token_id"),
}


def _time_ids(configs):
    unet = configs["unet"]
    n, rest = divmod(unet["projection_class_embeddings_input_dim"] - configs["text_encoder_2"]["projection_dim"],
                     unet["addition_time_embed_dim"])
    assert rest == 0
    return n


@pytest.mark.parametrize("name", NAMES)
def test_inference_on_the_tiny_files(name):
    from weights_port.convert import folder_configs
    from weights_port.infer import describe, infer_configs, sdxl_variant

    shapes = _shapes(tiny_models.original_state_dict(name))
    assert describe(shapes) == "sdxl"
    assert sdxl_variant(shapes) == ("refiner" if name == "tiny-sdxl-refiner" else "base")
    inferred, fixture = infer_configs(shapes), folder_configs(tiny_models.fixture_dir(name))
    assert sorted(inferred) == sorted(fixture)
    for component, fields in SHAPE_FIELDS.items():
        if component not in fixture:
            continue
        for field in fields:
            assert inferred[component][field] == fixture[component][field], (component, field)
    assert inferred["unet"]["in_channels"] == (9 if name == "tiny-sdxl-inpaint" else 4)
    assert inferred["unet"]["transformer_layers_per_block"] == ([1, 2, 3] if name != "tiny-sdxl-refiner" else 2)
    assert _time_ids(inferred) == _time_ids(fixture) == (5 if name == "tiny-sdxl-refiner" else 6)
    for section in ("pipeline", "tokenizer", "tokenizer_2"):
        assert inferred.get(section) == fixture.get(section), section
    assert inferred["vae"]["scaling_factor"] == fixture["vae"]["scaling_factor"] == 0.13025


def _full_size_shapes(name):
    with gzip.open(os.path.join(SHAPES, f"{name}.shapes.json.gz")) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_inference_on_the_full_size_layout_gives_the_official_configs(name):
    """Every field inferred from the real file's key shapes is the official diffusers config's
    (stabilityai/stable-diffusion-xl-base-1.0, -refiner-1.0), the scheduler section and the
    tokenizers' pads are those a conversion of the official folder writes."""
    from weights_port.convert import _clean_scheduler, folder_configs
    from weights_port.infer import describe, infer_configs

    shapes = _full_size_shapes(name)
    assert describe(shapes) == "sdxl"
    inferred, official = infer_configs(shapes), folder_configs(os.path.join(SHAPES, name))
    assert sorted(inferred) == sorted(official)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component not in official:
            continue
        for field, value in inferred[component].items():
            assert value == official[component][field], (component, field, value, official[component][field])
        for field in SHAPE_FIELDS[component] + {"unet": ("attention_head_dim", "sample_size")}.get(component, ()):
            assert field in inferred[component], (component, field)
    assert inferred["scheduler"] == _clean_scheduler(official["scheduler"], None)
    for section in ("pipeline", "tokenizer", "tokenizer_2"):
        assert inferred.get(section) == official.get(section), section
    base = name == "sd_xl_base_1.0"
    unet = inferred["unet"]
    assert unet["attention_head_dim"] == ([5, 10, 20] if base else [6, 12, 24, 24])
    assert unet["transformer_layers_per_block"] == ([1, 2, 10] if base else 4)
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"]) == (
        (2048, 2816) if base else (1280, 2560))
    assert _time_ids(inferred) == (6 if base else 5)
    assert inferred["text_encoder_2"]["num_hidden_layers"] == 32  # every layer, unlike SD 2.x


def test_the_full_size_files_extra_entries_are_allowed_and_nothing_else():
    """The entries of the real files that are not weights (and the denoiser's schedule of some
    fine-tunes) are on the allow-list; a bigG layer or a UNet key is never silently dropped."""
    from weights_port.convert import UNUSED_ORIGINAL

    allowed = lambda k: any(re.match(p, k) for p in UNUSED_ORIGINAL)  # noqa: E731
    for key in ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                "conditioner.embedders.1.model.logit_scale", "conditioner.embedders.0.model.logit_scale",
                "denoiser.sigmas"):
        assert allowed(key), key
    for name in FULL_SIZE:
        kept = [k for k in _full_size_shapes(name) if not allowed(k)]
        assert len(kept) == {"sd_xl_base_1.0": 2513, "sd_xl_refiner_1.0": 1857}[name]
    for key in ("conditioner.embedders.1.model.transformer.resblocks.31.ln_1.weight",
                "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
                "conditioner.embedders.2.model.ln_final.weight", "model.diffusion_model.input_blocks.1.1.norm.weight"):
        assert not allowed(key), key


# ---------------------------------------------------------------- bad input
def test_sdxl_and_sd1_configs_are_not_mixed_up(converted, tmp_path):
    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    from safetensors.numpy import save_file

    sdxl = converted["tiny-sdxl"][2]
    sd1 = str(tmp_path / "sd1.safetensors")  # the layout is judged before anything is built: a few keys do
    save_file({k: np.zeros((2, 2), "float32") for k in (
        "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")}, sd1)
    with pytest.raises(CheckpointError, match=r"looks like an SDXL base checkpoint \(CLIP ViT-L and OpenCLIP "
                       r"bigG text encoders\) but --config '.*tiny-sd1' describes an SD1\.x model"):
        convert_checkpoint(sdxl, str(tmp_path / "a"), config=tiny_models.fixture_dir("tiny-sd1"))
    with pytest.raises(CheckpointError, match=r"looks like an SD1\.x checkpoint .* but --config '.*tiny-sdxl' "
                       r"describes an SDXL base model"):
        convert_checkpoint(sd1, str(tmp_path / "b"), config=tiny_models.fixture_dir("tiny-sdxl"))
    assert os.listdir(tmp_path) == ["sd1.safetensors"]


def test_base_and_refiner_configs_are_not_mixed_up(converted, tmp_path, capsys):
    from weights_port.convert import convert_checkpoint, folder_configs
    from weights_port.errors import CheckpointError

    base, refiner = converted["tiny-sdxl"][2], converted["tiny-sdxl-refiner"][2]
    with pytest.raises(CheckpointError, match=r"looks like an SDXL refiner checkpoint \(the OpenCLIP bigG text "
                       r"encoder alone\) but --config '.*tiny-sdxl' describes an SDXL base model"):
        convert_checkpoint(refiner, str(tmp_path / "a"), config=tiny_models.fixture_dir("tiny-sdxl"))
    with pytest.raises(CheckpointError, match=r"looks like an SDXL base checkpoint .* but the config dict "
                       r"describes an SDXL refiner model"):
        convert_checkpoint(base, str(tmp_path / "b"), config=folder_configs(tiny_models.fixture_dir("tiny-sdxl-refiner")))
    assert run_cli([base, tmp_path / "c", "--config", tiny_models.fixture_dir("tiny-sdxl-refiner")]) == 2
    err = capsys.readouterr().err
    assert "looks like an SDXL base checkpoint" in err and "describes an SDXL refiner model" in err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("drop, found", [
    ("conditioner.embedders.1.", r"has CLIP ViT-L \(conditioner\.embedders\.0\.transformer\.\*\);"),
    ("conditioner.embedders.0.", r"has OpenCLIP bigG \(conditioner\.embedders\.1\.model\.\*\);"),
])
def test_a_base_file_with_one_text_encoder_is_refused(drop, found, tmp_path):
    from safetensors.numpy import save_file

    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    tensors = {k: np.ascontiguousarray(v) for k, v in tiny_models.original_state_dict("tiny-sdxl").items()
               if not k.startswith(drop)}
    src = str(tmp_path / "half.safetensors")
    save_file(tensors, src)
    for config in (None, tiny_models.fixture_dir("tiny-sdxl")):
        with pytest.raises(CheckpointError, match=found + r" an SDXL base file needs both"):
            convert_checkpoint(src, str(tmp_path / "m"), config=config)
    assert os.listdir(tmp_path) == ["half.safetensors"]


def test_a_missing_text_encoder_weight_is_named(tmp_path):
    from weights_port.convert import convert_checkpoint
    from weights_port.errors import CheckpointError

    key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    tensors = dict(tiny_models.original_state_dict("tiny-sdxl"))
    del tensors[key]
    src = str(tmp_path / "missing.ckpt")
    from support.torch_format import save_torch_zip

    save_torch_zip(tensors, src, wrap_in_state_dict=True)
    with pytest.raises(CheckpointError, match=r"\(text_encoder_2\): 3 weights not found.*" + re.escape(key)):
        convert_checkpoint(src, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == ["missing.ckpt"]


# ---------------------------------------------------------------- live: diffusers reads the same file
_DIFFUSERS_READS = textwrap.dedent("""
    import os, sys
    import diffusers
    from safetensors.torch import save_file
    out = sys.argv[1]
    for name, src, config, cls in zip(*[iter(sys.argv[2:])] * 4):
        pipe = getattr(diffusers, cls).from_single_file(src, config=config, local_files_only=True)
        os.makedirs(os.path.join(out, name))
        for c in ("text_encoder", "text_encoder_2", "unet", "vae"):
            model = getattr(pipe, c, None)
            if model is not None:
                state = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(state, os.path.join(out, name, c + ".safetensors"))
""")
PIPELINES = {"tiny-sdxl": "StableDiffusionXLPipeline", "tiny-sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
             "tiny-sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}


@pytest.fixture(scope="module")
def diffusers_read(converted, tmp_path_factory):
    """{name: folder of component.safetensors}: what diffusers' from_single_file loaded from our
    tiny SGM files (configs from the diffusers folders, offline), in one subprocess: torch
    imported after TensorFlow in one process can crash."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")):
        pytest.skip("live check needs torch, diffusers and transformers")
    out = tmp_path_factory.mktemp("diffusers-read")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    class Read(dict):
        """One subprocess per model, on first use."""

        def __missing__(self, name):
            single = converted[name][2]
            args = [name, single, os.path.join(os.path.dirname(single), f"{name}-diffusers"), PIPELINES[name]]
            done = subprocess.run([sys.executable, "-c", _DIFFUSERS_READS, str(out)] + args,
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            self[name] = out / name
            return self[name]

    return Read()


@pytest.mark.live
@pytest.mark.parametrize("name", [tiny_models.SDXL_NAMES[0]] + [pytest.param(n, marks=pytest.mark.heavy)
                                                                for n in tiny_models.SDXL_NAMES[1:]])
def test_diffusers_from_single_file_loads_what_we_converted(converted, diffusers_read, name):
    """diffusers' StableDiffusionXL*Pipeline.from_single_file reads our tiny SGM file into exactly the
    weights we converted from it."""
    from safetensors.numpy import load_file

    ours, folder = _weights(converted[name][1]), diffusers_read[name]
    bare = lambda k: k[len("text_model."):] if k.startswith("text_model.") else k  # noqa: E731
    assert sorted(f[: -len(".safetensors")] for f in os.listdir(folder)) == sorted(ours)
    for component, mine in ours.items():
        theirs = {k: v for k, v in load_file(str(folder / f"{component}.safetensors")).items()
                  if not k.endswith("position_ids")}
        if component.startswith("text_encoder"):  # transformers 5 flattens CLIPTextModel's text_model.
            theirs, mine = {bare(k): v for k, v in theirs.items()}, {bare(k): v for k, v in mine.items()}
        assert sorted(theirs) == sorted(mine), (component, sorted(set(theirs) ^ set(mine))[:10])
        for key, value in mine.items():
            np.testing.assert_array_equal(theirs[key], value, err_msg=f"{component} {key}")
