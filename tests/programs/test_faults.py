"""Fault injection: disk full, permission denied and Ctrl-C while writing an image, a converted
model folder or a training checkpoint. Whatever happens, nothing partial is left at the target
path, no temporary file is left beside it, and a previous good file or folder is unchanged.

The faults are simulated (this runs as root, where chmod does not stop writes, and a real full
disk cannot be arranged in CI): the write path's own calls raise at a chosen moment.
"""

import errno
import hashlib
import os

import h5py
import numpy as np
import pytest

from support import tiny_models

# Module-scoped fixtures are built once: under `-n 2` every test of this file goes to one worker.
pytestmark = pytest.mark.xdist_group("faults")

FAULTS = {
    "disk full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "permission denied": lambda: PermissionError(errno.EACCES, "Permission denied"),
    "Ctrl-C": lambda: KeyboardInterrupt(),
}


def tree_digest(path):
    """{relative path: sha256} of every file under `path` (or of the file itself)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fail_on_call(monkeypatch, target, name, fault, after=0):
    """Make `target.name` raise `fault()` on its call number `after` (0-based)."""
    real = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise fault()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


# ------------------------------------------------------------------ images
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_png_write_fault_leaves_no_partial_file(fault, existing, tmp_path, monkeypatch):
    from PIL import Image

    from diffusion_tf import png_info

    target = tmp_path / "out.png"
    if existing:
        png_info.save_png(str(target), np.full((8, 8, 3), 7, np.uint8), {"prompt": "old", "seed": 1})
    before = tree_digest(str(tmp_path))
    # the encoder fails half-way through (the file has been opened and partly written)
    fail_on_call(monkeypatch, Image.Image, "save", FAULTS[fault])
    with pytest.raises(type(FAULTS[fault]())):
        png_info.save_png(str(target), np.zeros((16, 16, 3), np.uint8), {"prompt": "new", "seed": 2})
    assert tree_digest(str(tmp_path)) == before  # old file intact (or none), no temp file


def test_cli_reports_a_failed_write_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    import text2image

    fault = "disk full"
    folder = tiny_models.converted_folder("tiny-sd1")
    fail_on_call(monkeypatch, os, "replace", FAULTS[fault])
    out = tmp_path / "img.png"
    code = text2image.main([
        "--model", folder, "--prompt", "a cat", "--steps", "2",
        "--height", "64", "--width", "64", "--output", str(out), "--seed", "3",
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ conversion (weights_port)
@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return tiny_models.write_single_file("tiny-sd1", str(tmp_path_factory.mktemp("src") / "tiny1.safetensors"))


def _convert(src, dst, overwrite=False):
    from weights_port.convert import convert_checkpoint

    return convert_checkpoint(src, str(dst), config=tiny_models.fixture_dir("tiny-sd1"), overwrite=overwrite,
                              log=lambda *_: None)


@pytest.mark.parametrize(
    "fault, moment, existing",
    [
        ("disk full", "second weights file", False),
        ("Ctrl-C", "final rename", False),
        # the same moments with other faults, with the heavy checks (CI's second step)
        pytest.param("disk full", "final rename", True, marks=pytest.mark.heavy),
        pytest.param("permission denied", "final rename", True, marks=pytest.mark.heavy),
        pytest.param("Ctrl-C", "second weights file", True, marks=pytest.mark.heavy),
    ],
)
def test_conversion_fault_leaves_the_destination_as_it_was(fault, moment, existing, sd1_file, tmp_path, monkeypatch):
    from diffusion_tf import model_folder, state_dict

    out = tmp_path / "models"
    dst = out / "tiny"
    if existing:
        _convert(sd1_file, dst)
    before = tree_digest(str(out)) if existing else {}
    if moment == "second weights file":  # the text encoder is written, the UNet's file fails
        fail_on_call(monkeypatch, state_dict.h5py.File, "create_dataset", FAULTS[fault], after=250)
    else:  # everything written, the rename onto the destination fails
        fail_on_call(monkeypatch, model_folder.os, "replace", FAULTS[fault], after=1 if existing else 0)
    with pytest.raises(type(FAULTS[fault]())):
        _convert(sd1_file, dst, overwrite=existing)
    monkeypatch.undo()
    if existing:
        assert tree_digest(str(out)) == before  # the previous good folder, byte for byte
        model_folder.read_config(str(dst))
    else:
        assert not os.path.exists(out) or os.listdir(out) == []


def test_conversion_fault_then_retry_succeeds(sd1_file, tmp_path, monkeypatch):
    from diffusion_tf import state_dict

    dst = tmp_path / "tiny"
    fail_on_call(monkeypatch, state_dict.h5py.File, "create_dataset", FAULTS["disk full"], after=10)
    with pytest.raises(OSError):
        _convert(sd1_file, dst)
    monkeypatch.undo()
    _convert(sd1_file, dst)
    assert sorted(os.listdir(tmp_path)) == ["tiny"]


# ------------------------------------------------------------------ training checkpoints
@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A tiny UNet-stage run with a good checkpoint: (save folder, the trainer-free run options)."""
    from diffusion_tf import train as T

    save = str(tmp_path_factory.mktemp("faults") / "run")
    T.train(save=save, stage="all", config="tiny", vae_epochs=1, vae_steps=1, epochs=1, steps=1,
            dataset_size=8, batch_size=4, vae_batch_size=4, verbose=0, run_eagerly=True, log=lambda *_: None)
    return save


@pytest.mark.heavy  # two tiny training runs: run by CI after the default suite (-m 'integration or heavy')
@pytest.mark.parametrize("fault", ["disk full", "Ctrl-C"])
def test_checkpoint_fault_keeps_the_previous_checkpoint(fault, trained_once, tmp_path, monkeypatch):
    import shutil

    from diffusion_tf import train as T

    save = str(tmp_path / "run")
    shutil.copytree(trained_once, save)
    ckpt = T.checkpoint_path(save, "unet")
    before = tree_digest(os.path.join(save, "checkpoints"))
    # resume for one more epoch; its end-of-epoch checkpoint fails half-way through the weights
    fail_on_call(monkeypatch, h5py.Group, "create_dataset", FAULTS[fault], after=40)
    with pytest.raises(type(FAULTS[fault]())):
        T.train(save=save, resume=True, epochs=2, verbose=0, run_eagerly=True, log=lambda *_: None)
    monkeypatch.undo()
    assert tree_digest(os.path.join(save, "checkpoints")) == before
    assert T.read_checkpoint_meta(ckpt)["epoch"] == 1
    # and the run resumes from it
    r = T.train(save=save, resume=True, epochs=2, verbose=0, run_eagerly=True, log=lambda *_: None)
    assert T.read_checkpoint_meta(ckpt)["epoch"] == 2 and r["model"] == save


# ------------------------------------------------------------------ loading our weights files
@pytest.mark.parametrize("damage", ["another model", "truncated", "NaN"])
def test_failed_weights_load_leaves_the_model_unchanged(damage, tmp_path):
    import copy

    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import WeightsError, load_weights, save_weights
    from diffusion_tf.train import PRESETS

    config = PRESETS["tiny"]["unet"]
    model = build_model("unet", config)
    before = [np.array(w) for w in model.get_weights()]
    path = str(tmp_path / "unet.weights.h5")
    if damage == "another model":
        other = copy.deepcopy(config)
        other["block_out_channels"] = [16, 32]
        save_weights(build_model("unet", other), path)
    else:
        save_weights(build_model("unet", config), path)
        if damage == "truncated":
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
        else:  # the last dataset poisoned: every check runs before the first assignment
            with h5py.File(path, "r+") as f:
                key = sorted(f.keys())[-1]
                data = f[key][()]
                data.flat[0] = np.nan
                f[key][...] = data
    with pytest.raises(WeightsError, match=r"unet\.weights\.h5"):
        load_weights(model, path)
    after = model.get_weights()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after))
