"""The web UI's generator on an SDXL model: micro-conditioning and guidance rescale reach the
pipeline, are recorded in the PNG, and bad values are messages (the page's AppError)."""

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.xdist_group("sdxl"), pytest.mark.heavy]  # whole-program runs: with the heavy tests


@pytest.fixture(scope="module")
def generator(tiny_sdxl_pipes, tmp_path_factory):
    from diffusion_tf.app import Generator

    return Generator(model=tiny_sdxl_pipes[("tiny-sdxl", "diffusers")].model_path,
                     output_dir=str(tmp_path_factory.mktemp("app-sdxl")), log=lambda *_: None)


def test_sdxl_controls_reach_the_pipeline_and_the_png(generator):
    from diffusion_tf.png_info import read_parameters

    assert generator.defaults()["xl"] is True
    (path, _), = generator.run("a cat!", negative_prompt="blurry", steps=3, guidance=5.0, seed=3, scheduler="euler",
                               width=64, height=64, original_size="96,128", crops_coords_top_left=" 8 , 16 ",
                               guidance_rescale=0.5)
    params = read_parameters(path)
    assert params["original_size"] == "96,128" and params["crops_coords_top_left"] == "8,16"
    assert params["guidance_rescale"] == 0.5 and "target_size" not in params
    pipe = generator.pipeline()
    expected = pipe.generate("a cat!", negative_prompt="blurry", num_steps=3, unconditional_guidance_scale=5.0,
                             seed=3, scheduler="euler", height=64, width=64, original_size=(96, 128),
                             crops_coords_top_left=(8, 16), guidance_rescale=0.5)
    image = np.asarray(Image.open(path))
    assert np.abs(image.astype(int) - expected[0].astype(int)).max() <= 1  # step by step vs the fused loop
    plain = pipe.generate("a cat!", negative_prompt="blurry", num_steps=3, unconditional_guidance_scale=5.0,
                          seed=3, scheduler="euler", height=64, width=64)
    assert np.abs(plain.astype(int) - expected.astype(int)).max() > 2  # the conditioning does something


@pytest.mark.parametrize("kw,message", [
    (dict(original_size="64"), "original_size='64'; must be a pair of integers"),
    (dict(target_size="a,b"), "target_size='a,b'; must be a pair of integers"),
    (dict(guidance_rescale=1.5), "guidance_rescale=1.5; must be a number between 0 and 1"),
])
def test_bad_sdxl_values_are_messages(generator, kw, message):
    from diffusion_tf.app import AppError

    with pytest.raises(AppError, match=message.replace("(", r"\(")):
        generator.run("a cat", steps=2, seed=1, width=64, height=64, **kw)
