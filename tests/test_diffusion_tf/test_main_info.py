"""`python -m diffusion_tf info`: version, backend, devices, presets, cache location."""

import json
import os
import subprocess
import sys

from diffusion_tf import __main__ as cli
from diffusion_tf import presets


def test_info_reports_cache_presets_and_default(tmp_path, monkeypatch, capsys):
    home = tmp_path / "elsewhere"
    monkeypatch.setenv("DIFFUSION_TF_HOME", str(home))
    cached = home / "models" / "sd-v2-1-base"
    cached.mkdir(parents=True)
    for name in ("config.json", "text_encoder.weights.h5", "unet.weights.h5", "vae.weights.h5"):
        (cached / name).write_bytes(b"x" * 1000)
    assert cli.main(["info", "--json", "--no-devices"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache"]["folder"] == str(home) and info["cache"]["set_by"] == "DIFFUSION_TF_HOME"
    assert info["cache"]["free_bytes"] > 0
    assert set(info["presets"]) == set(presets.list_presets())
    assert info["presets"]["sd-v2-1-base"] == {"cached": True, "folder": str(cached), "bytes": 4000}
    assert info["presets"]["sd-v1-5"]["cached"] is False
    assert info["default_model"] == ("shapes" if presets.builtin_available() else "sd-v1-5")
    assert info["builtin_model"]["folder"] == presets.builtin_folder()

    assert cli.main(["info", "--no-devices"]) == 0
    text = capsys.readouterr().out
    assert f"weights cache: {home} (set by DIFFUSION_TF_HOME)" in text
    assert "sd-v2-1-base   cached, 4.0 KB" in text and f"default model: {info['default_model']}" in text


def test_info_lists_devices_in_a_fresh_process(tmp_path):
    env = dict(os.environ, DIFFUSION_TF_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "diffusion_tf", "info"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend: Keras 3." in proc.stdout and "devices: CPU:/device:CPU:0" in proc.stdout


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().err
