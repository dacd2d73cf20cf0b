"""A quiet terminal: the programs print none of TensorFlow's start-up lines, and keep real ones."""

import os
import subprocess
import sys

import pytest

from diffusion_tf import startup_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "Could not find cuda drivers",
                 "cuInit", "cpu_feature_guard")

# As TensorFlow 2.21 prints them on a machine without a GPU, then other text.
BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = ("I0000 00:00:1796216605.744142    6399 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results.\n")
NO_DRIVER = "I0000 00:00:1796216605.744443    6399 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
FEATURES = ("2025-09-17 14:44:05.157831: I tensorflow/core/platform/cpu_feature_guard.cc:210] This TensorFlow "
            "binary is optimized to use available CPU instructions.\nTo enable the following instructions: AVX512F, "
            "in other operations, rebuild TensorFlow with the appropriate compiler flags.\n")
CUINIT = ("E0000 00:00:1796216609.322377    6399 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)\n")
ERROR = "E0000 00:00:1796216609.322377    6399 some_kernel.cc:12] a real error\n"
WARNING = "/x/module.py:3: UserWarning: a Python warning\n  warnings.warn(message)\n"


def test_filter_drops_records_below_the_level_and_keeps_the_rest():
    noise = BANNER + ONEDNN + NO_DRIVER + FEATURES + CUINIT
    assert startup_log.filter_lines(noise, 2) == ""
    assert startup_log.filter_lines(noise + ERROR + WARNING + "plain text\n", 2) == ERROR + WARNING + "plain text\n"
    assert startup_log.filter_lines(WARNING + ONEDNN + WARNING, 2) == WARNING + WARNING
    assert startup_log.filter_lines(noise + ERROR, 3) == ""  # TF_CPP_MIN_LOG_LEVEL=3: errors off too
    assert startup_log.filter_lines(noise, 0) == noise  # 0: everything
    assert startup_log.filter_lines(BANNER + ONEDNN, 1) == BANNER  # 1: warnings kept, info off
    # Without the no-driver line, a failed cuInit is a real error (a GPU machine's driver).
    assert startup_log.filter_lines(BANNER + CUINIT, 2) == CUINIT


@pytest.mark.parametrize("value, level", [(None, 0), ("2", 2), ("3", 3), ("x", 0)])
def test_min_level_reads_tensorflows_variable(value, level):
    env = {} if value is None else {"TF_CPP_MIN_LOG_LEVEL": value}
    assert startup_log.min_level(env) == level


def run(args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the default level
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, **kwargs)


def noise(stderr):
    return [line for line in stderr.splitlines() if any(n in line for n in STARTUP_NOISE)]


def test_weights_port_help_and_a_tiny_conversion_are_quiet(tmp_path):
    from support import tiny_models

    proc = run(["-m", "weights_port", "--help"])
    assert proc.returncode == 0 and "--config" in proc.stdout and proc.stderr == ""
    src = tiny_models.write_single_file("tiny-sd1", str(tmp_path / "tiny1.safetensors"))
    proc = run(["-m", "weights_port", src, str(tmp_path / "m"), "--config", tiny_models.fixture_dir("tiny-sd1")])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'm'}" in proc.stdout
    assert not noise(proc.stderr), proc.stderr


def test_filtered_stderr_replays_what_it_keeps(capfd):
    """The descriptor-level capture of C++ writes (os.write to fd 2); Python's sys.stderr is
    untouched (under pytest it is not even fd 2)."""
    with startup_log.filtered_stderr(level=2):
        os.write(2, (BANNER + ONEDNN + ERROR + WARNING).encode())
        sys.stderr.write("from Python\n")
    err = capfd.readouterr().err
    assert ERROR + WARNING in err and "from Python" in err and not noise(err)
    with pytest.raises(RuntimeError):
        with startup_log.filtered_stderr(level=2):
            os.write(2, (NO_DRIVER + "what a failing import printed\n").encode())
            raise RuntimeError("the import failed")
    assert capfd.readouterr().err == ""  # a continuation of the INFO record
    with pytest.raises(RuntimeError):
        with startup_log.filtered_stderr(level=2):
            os.write(2, ERROR.encode())
            raise RuntimeError("the import failed")
    assert capfd.readouterr().err == ERROR
