"""text2image.py --vae: another VAE for the run; a value that names nothing is exit 2 before any
model is loaded, a VAE that does not fit the model is exit 2 naming the option, and nothing is
written either way."""

import contextlib
import io
import os
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from support import vae_files

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import text2image  # noqa: E402

PROG = "text2image.py"
pytestmark = pytest.mark.xdist_group("tiny-sd1")


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = text2image.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _taesd(root, **change):
    from diffusion_tf.components import build_model
    from diffusion_tf.state_dict import state_dict_shapes

    config = dict(vae_files.config("tiny-taesd"), **change)
    state = vae_files.weights(state_dict_shapes(build_model("vae", config)))
    return vae_files.write_diffusers_folder(config, state, str(root))


def test_a_vae_that_names_nothing_is_exit_2_before_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--prompt", "x", "--model", "/nonexistent-model", "--vae", "/no/such/vae.safetensors"])
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert err.startswith(f"{PROG}: error: --vae /no/such/vae.safetensors: no such file or folder, and not a VAE "
                          "preset (taesd, taesdxl)")
    assert "nonexistent-model" not in err and os.listdir(tmp_path) == []


def test_a_vae_of_another_latent_width_is_exit_2_naming_the_option(tiny_folder, tmp_path, monkeypatch):
    wide = _taesd(tmp_path / "taesd16", latent_channels=16)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--prompt", "x", "--model", tiny_folder, "--vae", wide, "--steps", "1",
                              "--output", "o.png"])
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{PROG}: error:")]
    assert lines == [f"{PROG}: error: --vae {wide}: this AutoencoderTiny has 16 latent channels; the model's latents "
                     "have 4 (allowed: a VAE of 4 latent channels; 16-channel VAEs are for other models, e.g. "
                     "TAESD3/TAEF1 for SD3/FLUX)."], err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.heavy  # 10-20 s: with CI's heavy run, out of the default suite's time
def test_a_run_with_taesd_equals_text2image_with_vae(tiny_folder, tmp_path, monkeypatch):
    from diffusion_tf import Text2Image

    taesd = _taesd(tmp_path / "taesd")
    monkeypatch.chdir(tmp_path)
    args = ["--prompt", "a red circle", "--model", tiny_folder, "--steps", "2", "--height", "64", "--width", "64",
            "--seed", "3", "--output", "out.png"]
    code, out, err = run_cli(args + ["--vae", taesd])
    assert code == 0, err
    assert f"loading VAE {taesd}" in err and f", VAE {taesd}" in err
    image = np.asarray(Image.open(tmp_path / "out.png"))
    expected = Text2Image(model=tiny_folder, img_height=64, img_width=64, vae=taesd).generate(
        "a red circle", num_steps=2, seed=3)[0]
    np.testing.assert_array_equal(image, expected)
    code, _, err = run_cli(args[:-1] + ["own.png"])
    assert code == 0, err
    assert np.abs(np.asarray(Image.open(tmp_path / "own.png")).astype(int) - image.astype(int)).max() > 20
