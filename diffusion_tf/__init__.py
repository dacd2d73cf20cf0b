"""diffusion_tf: Stable Diffusion for Keras 3 on TensorFlow."""

import os as _os

from diffusion_tf import startup_log as _startup_log

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before anything imports TensorFlow: its log level, and its start-up lines off the terminal.
_startup_log.install()
# Before XLA reads its flags (at TensorFlow's first operation): the persistent compilation cache
# (DIFFUSION_TF_COMPILE_CACHE, see runtime.py).
from diffusion_tf import runtime as _runtime  # noqa: E402

_runtime.enable_compile_cache()
# Before TensorFlow reads it at import: oneDNN off unless the user set TF_ENABLE_ONEDNN_OPTS
# (its allocator keeps freed temporaries resident; see runtime.py).
_runtime.default_tensorflow_environ()

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import diffusion_tf` (and the CLI's --help) do not import TensorFlow.
    if name == "Text2Image":
        from diffusion_tf.pipeline.text_to_image import Text2Image

        return Text2Image
    if name == "CLIPTokenizer":
        from diffusion_tf.clip_tokenizer import CLIPTokenizer

        return CLIPTokenizer
    raise AttributeError(f"module 'diffusion_tf' has no attribute {name!r}")
