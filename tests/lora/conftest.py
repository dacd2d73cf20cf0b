"""The tiny SD 1.x networks shared by the LoRA tests that need no pipeline (every test leaves them
bit for bit as it found them), and the tiny-sd1 reference and pipeline of the parity tests (one
per module: test_lora_sdxl.py has its own `pipe` and `tiny`)."""

import pytest

from support import tiny_models


@pytest.fixture(scope="package")
def tiny_networks():
    from diffusion_tf.components import load_folder

    parts = load_folder(tiny_models.converted_folder("tiny-sd1"))
    return {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}


@pytest.fixture(scope="module")
def tiny():
    return tiny_models.reference("tiny-sd1")


@pytest.fixture(scope="module")
def pipe():
    from diffusion_tf import Text2Image

    pipe = Text2Image(model=tiny_models.converted_folder("tiny-sd1"), img_height=64, img_width=64)
    yield pipe
    pipe.unload_loras()
