"""Convert Stable Diffusion checkpoints (diffusers folders, original .safetensors/.ckpt)
into diffusion_tf model folders, safely: no code from a checkpoint is ever executed."""

from weights_port.errors import CheckpointError

__all__ = ["CheckpointError", "convert_checkpoint"]


def convert_checkpoint(*args, **kwargs):
    from weights_port.convert import convert_checkpoint as convert

    return convert(*args, **kwargs)
