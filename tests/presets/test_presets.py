"""Presets (JSON data) and the weights cache: no network, no real checkpoint, no model built."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

import weights_port
from diffusion_tf import presets, runtime
from diffusion_tf.presets import PresetUnavailableError, registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESET_DIR = ROOT / "diffusion_tf" / "presets"
SD_NAMES = ["sd-v1-5", "sd-v2-1", "sd-v2-1-base", "sd-turbo"]
SDXL_NAMES = ["sdxl-base-1.0", "sdxl-refiner-1.0", "sdxl-turbo"]
NAMES = SD_NAMES + SDXL_NAMES

TOP_KEYS = {"name", "description", "checkpoint", "license", "default_size", "configs"}
CHECKPOINT_KEYS = {"url", "filename", "sha256", "size_bytes"}
CONFIG_KEYS = {
    "text_encoder": {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
    },
    "unet": {
        "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
        "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
        "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps",
        "flip_sin_to_cos", "freq_shift",
    },
    "vae": {
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
    },
    "scheduler": {
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
        "timestep_spacing", "steps_offset", "set_alpha_to_one",
    },
    "tokenizer": {"pad_token_id", "context_length"},
}
# First 10 hex digits of each file's sha256 (the "model hash" AUTOMATIC1111's web UI shows).
SHORT_HASHES = {"sd-v1-5": "6ce0161689", "sd-v2-1": "dcd690123c", "sd-v2-1-base": "df955bdf6b",
                "sdxl-base-1.0": "31e35c80fc", "sdxl-refiner-1.0": "7440042bbd", "sdxl-turbo": "e869ac7d69"}
# SDXL's sections beyond SD's: the second encoder and tokenizer (the refiner has only these), the
# pipeline flags of model_index.json, the folder's generation defaults.
SDXL_UNET_KEYS = CONFIG_KEYS["unet"] | {"transformer_layers_per_block", "addition_embed_type",
                                        "addition_time_embed_dim", "projection_class_embeddings_input_dim"}
SDXL_CONFIG_KEYS = {
    "text_encoder": CONFIG_KEYS["text_encoder"],
    "text_encoder_2": CONFIG_KEYS["text_encoder"] | {"projection_dim", "bos_token_id", "eos_token_id", "pad_token_id"},
    "unet": SDXL_UNET_KEYS, "vae": CONFIG_KEYS["vae"] | {"force_upcast"}, "scheduler": CONFIG_KEYS["scheduler"],
    "tokenizer": CONFIG_KEYS["tokenizer"], "tokenizer_2": CONFIG_KEYS["tokenizer"],
    "pipeline": None, "defaults": {"num_steps", "guidance", "scheduler"},
}


@pytest.fixture
def home(tmp_path):
    with runtime.overridden(home=str(tmp_path / "home")):
        yield tmp_path / "home"


def patch_checkpoint(monkeypatch, name, **changes):
    """Make the registry report a different checkpoint (url, sha256, ...) for preset `name`."""
    real = registry.get_preset

    def fake(n):
        preset = real(n)
        if n == name:
            preset["checkpoint"].update(changes)
        return preset

    monkeypatch.setattr(registry, "get_preset", fake)


def fill_folder(folder, skip=None):
    os.makedirs(folder, exist_ok=True)
    for f in ("config.json", "text_encoder.weights.h5", "unet.weights.h5", "vae.weights.h5"):
        if f != skip:
            pathlib.Path(folder, f).write_text("{}" if f.endswith(".json") else "x")


def downloads(home):
    d = home / "downloads"
    return sorted(os.listdir(d)) if d.is_dir() else []


# ---------------------------------------------------------------- the data


@pytest.mark.parametrize("name", NAMES)
def test_preset_file_has_all_fields(name):
    with open(PRESET_DIR / f"{name}.json", encoding="utf-8") as f:
        p = json.load(f)
    assert TOP_KEYS <= set(p)
    assert p["name"] == name
    assert isinstance(p["description"], str) and p["description"]
    assert isinstance(p["license"], str) and p["license"]
    ck = p["checkpoint"]
    assert CHECKPOINT_KEYS <= set(ck)
    assert ck["url"].startswith("https://huggingface.co/")
    assert ck["url"].endswith(f"/resolve/main/{ck['filename']}")
    assert ck["filename"].endswith(".safetensors")
    assert ck["sha256"] is None or (len(ck["sha256"]) == 64 and set(ck["sha256"]) <= set("0123456789abcdef"))
    assert ck["size_bytes"] is None or ck["size_bytes"] > 10**9
    expected = (dict(CONFIG_KEYS, defaults={"num_steps", "guidance", "scheduler"}) if name == "sd-turbo"
                else CONFIG_KEYS) if name in SD_NAMES else {
        k: v for k, v in SDXL_CONFIG_KEYS.items() if name != "sdxl-refiner-1.0" or k not in ("text_encoder", "tokenizer")}
    assert set(p["configs"]) == set(expected)
    for component, keys in expected.items():
        assert keys is None or set(p["configs"][component]) == keys, component
    h, w = p["default_size"]
    assert h == w and h % 64 == 0
    # The UNet's latent sample size is the default image size / 8.
    assert p["configs"]["unet"]["sample_size"] * 8 == h
    assert p["configs"].get("tokenizer", p["configs"].get("tokenizer_2"))["context_length"] == 77


@pytest.mark.parametrize("name", sorted(SHORT_HASHES))
def test_pinned_hashes_match_the_published_short_hashes(name):
    assert presets.get_preset(name)["checkpoint"]["sha256"].startswith(SHORT_HASHES[name])


def test_sd15_values():
    c = presets.get_preset("sd-v1-5")["configs"]
    assert c["text_encoder"]["hidden_size"] == 768
    assert c["text_encoder"]["num_hidden_layers"] == 12
    assert c["text_encoder"]["num_attention_heads"] == 12
    assert c["text_encoder"]["intermediate_size"] == 3072
    assert c["text_encoder"]["hidden_act"] == "quick_gelu"
    assert c["unet"]["cross_attention_dim"] == 768
    assert c["unet"]["attention_head_dim"] == 8
    assert c["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert c["unet"]["use_linear_projection"] is False
    assert c["unet"]["sample_size"] == 64
    assert c["vae"]["block_out_channels"] == [128, 256, 512, 512]
    assert c["vae"]["scaling_factor"] == 0.18215
    assert c["scheduler"]["prediction_type"] == "epsilon"
    assert c["tokenizer"]["pad_token_id"] == 49407
    p = presets.get_preset("sd-v1-5")
    assert p["default_size"] == [512, 512]
    assert p["checkpoint"]["filename"] == "v1-5-pruned-emaonly.safetensors"
    assert "/stable-diffusion-v1-5/stable-diffusion-v1-5/" in p["checkpoint"]["url"]


@pytest.mark.parametrize("name", ["sd-v2-1", "sd-v2-1-base", "sd-turbo"])
def test_sd2_common_values(name):
    c = presets.get_preset(name)["configs"]
    assert c["text_encoder"]["hidden_size"] == 1024
    assert c["text_encoder"]["num_hidden_layers"] == 23
    assert c["text_encoder"]["num_attention_heads"] == 16
    assert c["text_encoder"]["intermediate_size"] == 4096
    assert c["text_encoder"]["hidden_act"] == "gelu"
    assert c["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert c["unet"]["use_linear_projection"] is True
    assert c["unet"]["cross_attention_dim"] == 1024
    assert c["tokenizer"]["pad_token_id"] == 0


def test_sd21_768_vs_base():
    v, base = presets.get_preset("sd-v2-1"), presets.get_preset("sd-v2-1-base")
    assert v["configs"]["scheduler"]["prediction_type"] == "v_prediction"
    assert base["configs"]["scheduler"]["prediction_type"] == "epsilon"
    assert v["configs"]["unet"]["sample_size"] == 96 and base["configs"]["unet"]["sample_size"] == 64
    assert v["configs"]["unet"]["upcast_attention"] is True
    assert base["configs"]["unet"]["upcast_attention"] is False
    assert v["default_size"] == [768, 768] and base["default_size"] == [512, 512]
    assert v["checkpoint"]["filename"] == "v2-1_768-ema-pruned.safetensors"
    assert base["checkpoint"]["filename"] == "v2-1_512-ema-pruned.safetensors"


def test_sd_turbo_is_sd21_base_with_few_step_defaults():
    """SD-Turbo: the SD 2.1-base networks (epsilon: Stability runs it with sd_2_1.yaml's EpsScaling),
    trailing timesteps, and folder defaults of 1 step, no guidance, Euler ancestral."""
    turbo, base = presets.get_preset("sd-turbo"), presets.get_preset("sd-v2-1-base")
    for component in ("text_encoder", "unet", "vae", "tokenizer"):
        assert turbo["configs"][component] == base["configs"][component], component
    assert turbo["configs"]["scheduler"] == dict(base["configs"]["scheduler"], timestep_spacing="trailing")
    assert turbo["configs"]["defaults"] == {"num_steps": 1, "guidance": 0.0, "scheduler": "euler_a"}
    assert turbo["default_size"] == [512, 512]
    assert turbo["checkpoint"]["sha256"] is None  # not confirmed: never downloaded unverified


def test_an_unpinned_preset_is_refused_with_how_to_install_it(home):
    with pytest.raises(PresetUnavailableError, match="no pinned sha256") as e:
        presets.ensure_preset("sd-turbo")
    assert "sd_turbo.safetensors" in str(e.value)


@pytest.mark.parametrize("name", SDXL_NAMES)
def test_sdxl_values(name):
    """The official diffusers configs of stabilityai's SDXL repositories, field by field where they differ."""
    p = presets.get_preset(name)
    c = p["configs"]
    refiner = name == "sdxl-refiner-1.0"
    assert c["text_encoder_2"]["hidden_size"] == 1280 and c["text_encoder_2"]["num_hidden_layers"] == 32
    assert c["text_encoder_2"]["num_attention_heads"] == 20 and c["text_encoder_2"]["projection_dim"] == 1280
    assert c["text_encoder_2"]["hidden_act"] == "gelu" and c["text_encoder_2"]["eos_token_id"] == 2
    assert c["tokenizer_2"]["pad_token_id"] == 0  # pads with "!"
    u = c["unet"]
    assert u["addition_embed_type"] == "text_time" and u["addition_time_embed_dim"] == 256
    assert u["use_linear_projection"] is True
    if refiner:
        assert "text_encoder" not in c and "tokenizer" not in c
        assert u["block_out_channels"] == [384, 768, 1536, 1536] and u["transformer_layers_per_block"] == 4
        assert u["attention_head_dim"] == [6, 12, 24, 24] and u["cross_attention_dim"] == 1280
        assert u["projection_class_embeddings_input_dim"] == 1280 + 5 * 256  # pooled + 5 time ids
        assert c["pipeline"] == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    else:
        assert c["text_encoder"]["hidden_size"] == 768 and c["tokenizer"]["pad_token_id"] == 49407
        assert u["block_out_channels"] == [320, 640, 1280] and u["transformer_layers_per_block"] == [1, 2, 10]
        assert u["attention_head_dim"] == [5, 10, 20] and u["cross_attention_dim"] == 768 + 1280
        assert u["down_block_types"][0] == "DownBlock2D"  # the first level has no attention
        assert u["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
        assert c["pipeline"] == {"force_zeros_for_empty_prompt": True}
    assert c["vae"]["scaling_factor"] == 0.13025 and c["vae"]["force_upcast"] is True
    if name == "sdxl-turbo":
        assert p["default_size"] == [512, 512] and c["scheduler"]["timestep_spacing"] == "trailing"
        assert c["defaults"] == {"num_steps": 1, "guidance": 0.0, "scheduler": "euler_a"}
    else:
        assert p["default_size"] == [1024, 1024] and c["scheduler"]["timestep_spacing"] == "leading"
        assert c["defaults"] == {"num_steps": 50, "guidance": 5.0, "scheduler": "euler"}  # diffusers' defaults


@pytest.mark.parametrize("name", NAMES)
def test_preset_configs_are_accepted_by_the_converter(name):
    from weights_port.convert import given_configs

    configs = given_configs(presets.get_preset(name)["configs"])
    assert "scheduler" in configs


# ---------------------------------------------------------------- the API


def test_list_presets():
    assert presets.list_presets() == sorted(NAMES)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        presets.get_preset("sd-v9")
    assert "'sd-v9'" in str(e.value)
    for name in NAMES:
        assert name in str(e.value)
    assert not isinstance(e.value, PresetUnavailableError)


@pytest.mark.parametrize("bad", [None, 15, ["sd-v1-5"]])
def test_non_string_name(bad):
    with pytest.raises(ValueError, match="string"):
        presets.get_preset(bad)


def test_get_preset_returns_a_copy():
    presets.get_preset("sd-v1-5")["configs"]["unet"]["sample_size"] = 1
    assert presets.get_preset("sd-v1-5")["configs"]["unet"]["sample_size"] == 64


def test_cache_dir_honours_env(home):
    assert not home.exists()
    assert presets.cache_dir() == str(home)
    assert home.is_dir()


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with runtime.overridden(home=None):
        assert presets.cache_dir() == str(tmp_path / ".cache" / "diffusion_tf")
    assert (tmp_path / ".cache" / "diffusion_tf").is_dir()


def test_cache_dir_is_the_home_read_once(tmp_path):
    """DIFFUSION_TF_HOME is read once, in a fresh process: changing it later moves nothing."""
    code = (
        "import os, diffusion_tf.presets as p\n"
        "first = p.cache_dir()\n"
        "os.environ['DIFFUSION_TF_HOME'] = os.path.join(os.environ['DIFFUSION_TF_HOME'], 'later')\n"
        "assert p.cache_dir() == first, (first, p.cache_dir())\n"
        "print(first)\n"
    )
    env = dict(os.environ, DIFFUSION_TF_HOME=str(tmp_path / "h"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "h")


def test_preset_folder(home):
    assert presets.preset_folder("sd-v2-1") == str(home / "models" / "sd-v2-1")
    with pytest.raises(ValueError, match="valid presets"):
        presets.preset_folder("nope")


def test_is_cached(home):
    folder = home / "models" / "sd-v1-5"
    assert not presets.is_cached("sd-v1-5")
    fill_folder(folder, skip="unet.weights.h5")
    assert not presets.is_cached("sd-v1-5")
    fill_folder(folder)
    assert presets.is_cached("sd-v1-5")
    assert not presets.is_cached("sd-v2-1")


def test_ensure_preset_uses_the_cache(home, monkeypatch):
    fill_folder(home / "models" / "sd-v2-1")
    patch_checkpoint(monkeypatch, "sd-v2-1", url="http://127.0.0.1:9/never-fetched")
    assert presets.ensure_preset("sd-v2-1") == str(home / "models" / "sd-v2-1")
    assert presets.ensure_preset("sd-v2-1", download=False) == str(home / "models" / "sd-v2-1")


def test_download_false(home):
    with pytest.raises(PresetUnavailableError) as e:
        presets.ensure_preset("sd-v1-5", download=False)
    msg = str(e.value)
    assert "download=False" in msg
    assert str(home / "models" / "sd-v1-5") in msg
    assert "python -m weights_port" in msg and "--config sd-v1-5" in msg
    assert downloads(home) == []


def test_unpinned_checkpoint_is_never_downloaded(home, monkeypatch):
    patch_checkpoint(monkeypatch, "sd-v1-5", sha256=None, url="http://127.0.0.1:9/x")
    with pytest.raises(PresetUnavailableError, match="no pinned sha256"):  # not "downloading ... failed"
        presets.ensure_preset("sd-v1-5")
    assert downloads(home) == []


def test_wrong_sha256_deletes_the_file(home, tmp_path, monkeypatch):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"not the real checkpoint")
    patch_checkpoint(monkeypatch, "sd-v1-5", url=src.as_uri(), sha256="0" * 64)
    with pytest.raises(PresetUnavailableError) as e:
        presets.ensure_preset("sd-v1-5")
    msg = str(e.value)
    assert src.as_uri() in msg and "failed" in msg
    assert "hash" in msg
    assert "python -m weights_port" in msg
    assert downloads(home) == []
    assert not presets.is_cached("sd-v1-5")


def test_unreachable_url(home, monkeypatch):
    url = "http://127.0.0.1:9/v1-5-pruned-emaonly.safetensors"  # port 9 (discard) refuses
    patch_checkpoint(monkeypatch, "sd-v1-5", url=url)
    with pytest.raises(PresetUnavailableError) as e:
        presets.ensure_preset("sd-v1-5")
    msg = str(e.value)
    assert "'sd-v1-5'" in msg
    assert str(home / "models" / "sd-v1-5") in msg
    assert url in msg
    assert "python -m weights_port" in msg and "--config sd-v1-5" in msg
    assert "model=" in msg
    first_line = msg.splitlines()[0]
    assert "failed (" in first_line  # the reason stays on one line
    assert downloads(home) == []


def test_download_and_convert(home, tmp_path, monkeypatch):
    payload = b"pretend safetensors" * 100
    src = tmp_path / "ckpt.safetensors"
    src.write_bytes(payload)
    patch_checkpoint(
        monkeypatch, "sd-v2-1-base", url=src.as_uri(), sha256=hashlib.sha256(payload).hexdigest()
    )
    calls = []

    def fake_convert(src_path, dst, config=None, prediction_type=None, dtype="float32", overwrite=False,
                     config_name=None):
        calls.append((src_path, dst, config, config_name))
        with open(src_path, "rb") as f:
            assert f.read() == payload
        fill_folder(dst)
        return dst

    monkeypatch.setattr(weights_port, "convert_checkpoint", fake_convert)

    folder = presets.ensure_preset("sd-v2-1-base")
    assert folder == str(home / "models" / "sd-v2-1-base")
    assert presets.is_cached("sd-v2-1-base")
    # The converter gets the preset's configs (it takes no preset names); the name is for its messages.
    configs = presets.get_preset("sd-v2-1-base")["configs"]
    assert calls == [(str(home / "downloads" / "v2-1_512-ema-pruned.safetensors"), folder, configs, "sd-v2-1-base")]
    assert downloads(home) == ["v2-1_512-ema-pruned.safetensors"]
    # Cached now: no second download or conversion.
    assert presets.ensure_preset("sd-v2-1-base") == folder
    assert len(calls) == 1


def test_import_does_not_load_tensorflow_or_keras():
    code = (
        "import sys, diffusion_tf.presets as p\n"
        "p.list_presets(); p.get_preset('sd-v1-5')\n"
        "loaded = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- resolve_model


def test_resolve_model_folder_builtin_and_presets(home, tmp_path):
    from diffusion_tf.presets.resolve import resolve_model

    assert resolve_model(tmp_path) == str(tmp_path)  # a folder, str or PathLike
    if presets.builtin_available():
        assert resolve_model("shapes") == presets.builtin_folder()
    else:
        with pytest.raises(ValueError, match="built-in shapes model's weights are not installed"):
            resolve_model("shapes")
    fill_folder(home / "models" / "sd-v2-1")
    assert resolve_model("sd-v2-1", download=False) == str(home / "models" / "sd-v2-1")
    with pytest.raises(PresetUnavailableError, match="download=False"):
        resolve_model("sd-v1-5", download=False)


def test_resolve_model_default_logs_its_note(home):
    from diffusion_tf.presets.resolve import resolve_model

    notes = []
    if presets.builtin_available():
        assert resolve_model(None, log=notes.append) == presets.builtin_folder()
    else:
        with pytest.raises(PresetUnavailableError):
            resolve_model(None, download=False, log=notes.append)
    assert len(notes) == 1 and notes[0] == presets.default_model()[1]
    fill_folder(home / "models" / "sd-v1-5")
    assert resolve_model(None) == str(home / "models" / "sd-v1-5")


@pytest.mark.parametrize("bad, message", [
    (15, "must be a model folder, a preset name or None"),
    ("sd-v9", "neither a model folder nor a preset; presets: shapes, sd-turbo, sd-v1-5, sd-v2-1, sd-v2-1-base"),
])
def test_resolve_model_refuses_what_it_cannot_resolve(home, bad, message):
    from diffusion_tf.presets.resolve import resolve_model

    with pytest.raises(ValueError, match=message) as e:
        resolve_model(bad)
    assert repr(bad) in str(e.value)


def test_the_converter_never_imports_presets():
    """The layering: presets (resolution) import weights_port; weights_port's converter, and
    everything under it, never import diffusion_tf.presets (only its CLI looks presets up)."""
    import ast

    for path in sorted((ROOT / "weights_port").glob("*.py")):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  for a in n.names]
        assert not [n for n in names if "presets" in n], (path.name, names)


def test_model_label_is_the_name_the_user_gave():
    assert presets.model_label("runs/shapes", "/abs/runs/shapes") == "runs/shapes"
    assert presets.model_label("sd-v1-5", presets.preset_folder("sd-v1-5")) == "sd-v1-5"
    assert presets.model_label(None, presets.builtin_folder()) == "shapes"
    assert presets.model_label(None, presets.preset_folder("sd-v2-1")) == "sd-v2-1"
    assert presets.model_label(None, "/some/folder") == "/some/folder"
