"""SDXL's bad inputs: each a ValueError naming the value and what is allowed, raised before any work.

The request rules themselves (sizes, micro-conditioning ranges, denoising_start/end in (0, 1)) are
in test_request.py; here: what depends on the model (a refiner used as a base, components of
different models, time ids that do not fit the folder's flags, hand-off bounds on a schedule).
"""

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("sdxl")


@pytest.fixture(scope="module")
def base(tiny_sdxl_pipes):
    return tiny_sdxl_pipes[("tiny-sdxl", "diffusers")]


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_pipes):
    return tiny_sdxl_pipes[("tiny-sdxl-refiner", "diffusers")]


def test_the_pipelines_know_their_family(base, refiner):
    assert base.is_xl and not base.is_refiner and base.num_time_ids == 6
    assert refiner.is_xl and refiner.is_refiner and refiner.num_time_ids == 5
    assert refiner.text_encoder is None and refiner.tokenizer_2 is not None


def test_a_refiner_is_not_a_base(refiner):
    with pytest.raises(ValueError, match=r"is an SDXL refiner .* only refines. Give init_image="):
        refiner.generate("a cat", num_steps=2)


@pytest.mark.parametrize("kw,match", [
    (dict(denoising_start=0.5), r"denoising_start=0.5 needs init_latents= or init_image="),
    (dict(denoising_end=0.01, num_steps=2), r"denoising_end=0.01 leaves no step to run"),
    (dict(denoising_end=1.5), r"denoising_end=1.5; must be a number strictly between 0 and 1"),
    (dict(original_size=(0, 64)), r"original_size=\(0, 64\); must be a pair of integers"),
    (dict(aesthetic_score=11), r"aesthetic_score=11; must be a number between 0 and 10"),
    (dict(guidance_rescale=-0.1), r"guidance_rescale=-0.1; must be a number between 0 and 1"),
    (dict(clip_skip=2), r"clip_skip=2; must be an integer from 0 to 1"),
])
def test_bad_generation_inputs(base, kw, match):
    with pytest.raises(ValueError, match=match):
        base.generate("a cat", **{"num_steps": 4, **kw})


def test_init_latents_must_be_latents(refiner):
    with pytest.raises(ValueError, match=r"init_latents has shape \(1, 8, 8, 3\); expected \[B, h, w, 4\]"):
        refiner.generate("a cat", init_latents=np.zeros((1, 8, 8, 3), "float32"), denoising_start=0.8)


def _edited_copy(pipe, tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(pipe.model_path, folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    edit(config)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    return str(folder)


def test_components_of_different_models_are_refused(base, tmp_path):
    from diffusion_tf import Text2Image

    def drop_first_encoder(config):  # 48-wide context for a UNet that attends to 80
        del config["text_encoder"], config["tokenizer"]

    with pytest.raises(ValueError, match=r"context 48 wide \(48\) but the UNet attends to 80"):
        Text2Image(model=_edited_copy(base, tmp_path, drop_first_encoder), img_height=64, img_width=64)


def test_time_ids_must_fit_the_flags(refiner, tmp_path):
    from diffusion_tf import Text2Image

    def as_base(config):
        config["pipeline"]["requires_aesthetics_score"] = False

    with pytest.raises(ValueError, match=r"reads 5 time ids but the folder says requires_aesthetics_score=False"):
        Text2Image(model=_edited_copy(refiner, tmp_path, as_base), img_height=64, img_width=64)
