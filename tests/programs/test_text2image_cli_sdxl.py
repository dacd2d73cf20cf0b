"""The command line with SDXL: micro-conditioning flags, the base + refiner ensemble, their PNG
parameters and --from-png, and the SDXL bad inputs (exit 2, one line, nothing written)."""

import contextlib
import io
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import text2image  # noqa: E402

pytestmark = [pytest.mark.xdist_group("sdxl"), pytest.mark.heavy]  # whole-program runs: with the heavy tests
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse!", "blurry"


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = text2image.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def models(tiny_sdxl_pipes):
    return {name: tiny_sdxl_pipes[(name, "diffusers")] for name in ("tiny-sdxl", "tiny-sdxl-refiner")}


@pytest.fixture(scope="module")
def ensemble(models, tmp_path_factory):
    """One CLI run of base + refiner with micro-conditioning."""
    out = tmp_path_factory.mktemp("cli-sdxl") / "xl.png"
    argv = ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--model", models["tiny-sdxl"].model_path,
            "--refiner", models["tiny-sdxl-refiner"].model_path, "--steps", "5", "--guidance", "5",
            "--seed", "7", "--scheduler", "euler", "--height", "64", "--width", "64",
            "--original-size", "96x128", "--crops-coords-top-left", "8,16", "--prompt-syntax", "plain",
            "--output", str(out)]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    return out, stderr


def test_base_and_refiner_give_the_library_hand_off(ensemble, models):
    out, stderr = ensemble
    assert "refiner" in stderr and "from 0.8 of the schedule" in stderr
    base, refiner = models["tiny-sdxl"], models["tiny-sdxl-refiner"]
    kw = dict(negative_prompt=NEGATIVE, num_steps=5, unconditional_guidance_scale=5, seed=7, scheduler="euler",
              original_size=(96, 128), crops_coords_top_left=(8, 16))
    latents = base.generate(PROMPT, height=64, width=64, denoising_end=0.8, output_type="latent", **kw)
    expected = refiner.generate(PROMPT, init_latents=latents, denoising_start=0.8, **kw)
    image = np.asarray(Image.open(out))
    assert np.abs(image.astype(int) - expected[0].astype(int)).max() <= 1  # step by step vs the fused loop


def test_png_records_the_sdxl_parameters(ensemble, models):
    from diffusion_tf.png_info import read_parameters

    params = read_parameters(str(ensemble[0]))
    assert params["original_size"] == "96,128" and params["crops_coords_top_left"] == "8,16"
    assert params["refiner"] == models["tiny-sdxl-refiner"].model_path and params["refiner_switch_at"] == 0.8
    assert "target_size" not in params and "aesthetic_score" not in params  # defaults are not written


def test_from_png_regenerates_the_ensemble(ensemble, tmp_path):
    again = tmp_path / "again.png"
    code, _, stderr = run_cli(["--from-png", str(ensemble[0]), "--output", str(again)])
    assert code == 0, stderr
    assert "--refiner" in stderr and "--original-size" in stderr
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(ensemble[0])))


@pytest.mark.parametrize("extra,message", [
    (["--denoising-end", "0.7"], "--denoising-end 0.7: only with --refiner"),
    (["--original-size", "0,64"], "--original-size 0,64: must be a pair of integers (height, width in pixels)"),
    (["--crops-coords-top-left", "a,b"], "--crops-coords-top-left a,b: must be a pair of integers (top, left"),
    (["--aesthetic-score", "12"], "--aesthetic-score 12: must be a number between 0 and 10"),
    (["--guidance-rescale", "2"], "--guidance-rescale 2: must be a number between 0 and 1"),
    (["--refiner", "R", "--denoising-end", "1"], "--denoising-end 1: must be a number strictly between 0 and 1"),
])
def test_bad_sdxl_arguments_exit_2_before_loading(extra, message, tmp_path):
    code, _, stderr = run_cli(["--prompt", "x", "--output", str(tmp_path / "o.png")] + extra)
    assert code == 2 and message in stderr, stderr
    assert not list(tmp_path.iterdir())


def test_model_errors_exit_2_without_files(models, tiny_folder, tmp_path):
    out = tmp_path / "o.png"
    base, refiner = models["tiny-sdxl"].model_path, models["tiny-sdxl-refiner"].model_path
    for argv, message in (
        (["--model", refiner], "is an SDXL refiner"),
        (["--model", tiny_folder, "--original-size", "64,64"], "micro-conditioning is read by SDXL models only"),
        (["--model", base, "--refiner", tiny_folder], "is not an SDXL model"),
    ):
        code, _, stderr = run_cli(["--prompt", "x", "--steps", "2", "--output", str(out)] + argv)
        assert code == 2 and message in stderr, (argv, stderr)
        assert not out.exists()
