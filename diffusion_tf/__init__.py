"""diffusion_tf: Stable Diffusion for Keras 3 on TensorFlow."""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import diffusion_tf` (and the CLI's --help) do not import TensorFlow.
    if name == "Text2Image":
        from diffusion_tf.text2image import Text2Image

        return Text2Image
    if name == "CLIPTokenizer":
        from diffusion_tf.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer
    raise AttributeError(f"module 'diffusion_tf' has no attribute {name!r}")
