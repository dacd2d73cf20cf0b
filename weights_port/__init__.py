"""Convert Stable Diffusion checkpoints (diffusers folders, original .safetensors/.ckpt)
into diffusion_tf model folders, safely: no code from a checkpoint is ever executed."""

# diffusion_tf's start-up first (importing any of its modules runs the package's __init__): it
# selects the Keras backend and quiets TensorFlow's start-up lines before the converter imports
# TensorFlow.
import diffusion_tf.startup_log  # noqa: F401
from weights_port.errors import CheckpointError

__all__ = ["CheckpointError", "convert_checkpoint"]


def convert_checkpoint(*args, **kwargs):
    from weights_port.convert import convert_checkpoint as convert

    return convert(*args, **kwargs)
