"""The tiny SD 1.x networks shared by the LoRA tests that need no pipeline (every test leaves them
bit for bit as it found them)."""

import pytest

from support import tiny_models


@pytest.fixture(scope="package")
def tiny_networks():
    from diffusion_tf.components import load_folder

    parts = load_folder(tiny_models.converted_folder("tiny-sd1"))
    return {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}
