"""LoRA loading: kohya / A1111, diffusers / PEFT and old diffusers attention-processor files,
merged into the networks' weights (no per-step cost) and taken out again exactly.

    from diffusion_tf.lora import LoraStack, file_hash
    stack = LoraStack({"unet": unet, "text_encoder": text_encoder})
    name = stack.load("style.safetensors", scale=0.7)
    stack.set_scale(name, 0.4); stack.remove(name); stack.unload_all()

See formats.py for the formats read and refused, stack.py for the merging rules.
"""

from diffusion_tf.lora.errors import LoraError
from diffusion_tf.lora.hashes import file_hash, full_file_hash
from diffusion_tf.lora.stack import LoraEntry, LoraStack, check_scale

__all__ = ["LoraEntry", "LoraError", "LoraStack", "check_scale", "file_hash", "full_file_hash"]
