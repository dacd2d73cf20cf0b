"""Convert Stable Diffusion checkpoints (diffusers folders, original .safetensors/.ckpt)
into diffusion_tf model folders, safely: no code from a checkpoint is ever executed."""

# diffusion_tf first: it selects the Keras backend and quiets TensorFlow's start-up lines
# (diffusion_tf/startup_log.py) before the converter imports TensorFlow.
import diffusion_tf  # noqa: F401
from weights_port.errors import CheckpointError

__all__ = ["CheckpointError", "convert_checkpoint"]


def convert_checkpoint(*args, **kwargs):
    from weights_port.convert import convert_checkpoint as convert

    return convert(*args, **kwargs)
