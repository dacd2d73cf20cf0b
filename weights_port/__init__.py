"""Convert Stable Diffusion checkpoints into diffusion_tf model folders."""
