"""VAE presets (taesd, taesdxl): the data, the cache, a verified download converted once. No
network: the weights file is a local full-size random-weight TAESD served by file:// URL."""

import hashlib
import os
import re

import pytest

from diffusion_tf import presets, runtime
from diffusion_tf.presets import PresetUnavailableError
from diffusion_tf.presets import vae as vae_presets
from support import vae_files

NAMES = ["taesd", "taesdxl"]
# Published by Hugging Face for diffusion_pytorch_model.safetensors at the pinned commits (see the
# presets' "note"): both files are 9,793,292 bytes.
SHA256 = {"taesd": "db169d69145ec4ff064e49d99c95fa05d3eb04ee453de35824a6d0f325513549",
          "taesdxl": "ff4824aca94dd6111e0340fa749347fb74101060d9712cb5ef1ca8f1cf17502f"}


@pytest.fixture
def home(tmp_path):
    with runtime.overridden(home=str(tmp_path / "home")):
        yield tmp_path / "home"


def test_vae_presets_are_data_apart_from_the_model_presets():
    assert vae_presets.list_vae_presets() == NAMES
    assert not set(NAMES) & set(presets.list_presets())
    for name in NAMES:
        preset = vae_presets.get_vae_preset(name)
        assert set(preset) == {"name", "description", "weights", "license", "for", "config"}
        weights = preset["weights"]
        assert weights["sha256"] == SHA256[name] and weights["size_bytes"] == 9793292
        assert re.fullmatch(r"[0-9a-f]{40}", weights["revision"])
        assert weights["url"] == (f"https://huggingface.co/{weights['repo']}/resolve/{weights['revision']}/"
                                  "diffusion_pytorch_model.safetensors")
        assert preset["for"] == (["sd"] if name == "taesd" else ["sdxl"])
    with pytest.raises(ValueError, match="unknown VAE preset 'taesd3'; VAE presets: taesd, taesdxl"):
        vae_presets.get_vae_preset("taesd3")
    with pytest.raises(ValueError, match="is neither a model folder nor a preset"):
        presets.resolve_model("taesd", download=False)


def test_preset_config_is_the_full_size_taesd_diffusers_builds():
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import state_dict_shapes

    full = vae_files.full_size()
    for name in NAMES:
        config = vae_presets.get_vae_preset(name)["config"]
        assert config["_class_name"] == "AutoencoderTiny"
        assert all(full["config"][k] == v for k, v in config.items() if k != "_class_name")
        assert state_dict_shapes(build_model("vae", config)) == full["shapes"]


def _patch_weights(monkeypatch, name, **changes):
    real = vae_presets.get_vae_preset

    def fake(n):
        preset = real(n)
        if n == name:
            preset["weights"].update(changes)
        return preset

    monkeypatch.setattr(vae_presets, "get_vae_preset", fake)


@pytest.fixture(scope="module")
def full_size_file(tmp_path_factory):
    """A full-size TAESD in diffusers' layout (random weights), as the preset's file is."""
    full = vae_files.full_size()
    folder = vae_files.write_diffusers_folder(full["config"], vae_files.weights(full["shapes"]),
                                              str(tmp_path_factory.mktemp("taesd") / "hf"))
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


def test_download_verify_convert_once(home, full_size_file, monkeypatch):
    from diffusion_tf.components import load_vae_folder

    path, sha = full_size_file
    src = "file://" + path
    _patch_weights(monkeypatch, "taesd", url=src, sha256=sha)
    folder = vae_presets.resolve_vae("taesd")
    assert folder == str(home / "vaes" / "taesd") and vae_presets.is_vae_cached("taesd")
    section, model = load_vae_folder(folder)
    assert section["_class_name"] == "AutoencoderTiny" and model.downsampling_factor == 8
    assert sorted(os.listdir(home / "downloads")) == ["taesd-diffusion_pytorch_model.safetensors"]
    _patch_weights(monkeypatch, "taesd", url="http://127.0.0.1:9/never-fetched", sha256=sha)
    assert vae_presets.ensure_vae_preset("taesd", download=False) == folder  # cached: nothing fetched


def test_wrong_hash_deletes_the_file_and_says_how_to_install_by_hand(home, full_size_file, monkeypatch):
    path, _ = full_size_file
    _patch_weights(monkeypatch, "taesdxl", url="file://" + path, sha256="0" * 64)
    with pytest.raises(PresetUnavailableError) as e:
        vae_presets.ensure_vae_preset("taesdxl")
    msg = str(e.value)
    assert "preset 'taesdxl'" in msg and "failed" in msg
    assert f"python -m weights_port --vae <downloaded file> {home / 'vaes' / 'taesdxl'}" in msg
    assert "pass vae=<that folder>" in msg
    assert os.listdir(home / "downloads") == [] and not vae_presets.is_vae_cached("taesdxl")


def test_unpinned_weights_are_never_downloaded(home, monkeypatch):
    _patch_weights(monkeypatch, "taesd", sha256=None, url="http://127.0.0.1:9/x")
    with pytest.raises(PresetUnavailableError, match="no pinned sha256"):
        vae_presets.ensure_vae_preset("taesd")


def test_resolve_vae_values(tmp_path):
    assert vae_presets.resolve_vae(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"vae=3; must be a VAE folder or file"):
        vae_presets.resolve_vae(3)
    with pytest.raises(ValueError, match=r"vae='nope' is neither a folder, a file nor a VAE preset; VAE presets: "
                                         r"taesd, taesdxl"):
        vae_presets.resolve_vae("nope")
