"""`python -m diffusion_tf info`: version, backend, devices, presets, cache location."""

import json
import os
import subprocess
import sys

from diffusion_tf import __main__ as cli
from diffusion_tf import presets, runtime

# What TensorFlow prints when it starts (absl before InitializeLog, oneDNN, CUDA without a driver).
STARTUP_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "Could not find cuda drivers",
                 "cuInit", "cpu_feature_guard")


def test_info_reports_cache_presets_and_default(tmp_path, capsys):
    home = tmp_path / "elsewhere"
    with runtime.overridden(home=str(home)):
        check_info(home, capsys)


def check_info(home, capsys):
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


def test_info_lists_devices_in_a_fresh_process_quietly(tmp_path):
    """Importing TensorFlow and listing its devices prints none of its start-up lines."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the default level
    env["DIFFUSION_TF_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "diffusion_tf", "info"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend: Keras 3." in proc.stdout and "devices: CPU:/device:CPU:0" in proc.stdout
    assert f"weights cache: {tmp_path} (set by DIFFUSION_TF_HOME)" in proc.stdout
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in STARTUP_NOISE)], proc.stderr


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().err
