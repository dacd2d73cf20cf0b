"""Prompts as Stable Diffusion users write them.

- `syntax`: A1111's emphasis `(word:1.2)`, `[word]`, BREAK and `<lora:NAME:SCALE>` tags (no TensorFlow);
- `chunks`: a prompt -> 77-token chunks of ids and per-token weights (prompts longer than 77 tokens);
- `textual_inversion`: embedding files (A1111, diffusers, SDXL) -> tokens and vectors;
- `conditioning`: `TextConditioning`, the ids and weights -> the UNet's context (emphasis, clip skip).
"""
