"""The three networks of Stable Diffusion, each built from a diffusers-style config (and TAESD, a
VAE to swap in)."""

from diffusion_tf.models.autoencoder_kl import AutoencoderKL
from diffusion_tf.models.autoencoder_tiny import AutoencoderTiny
from diffusion_tf.models.clip_text_model import CLIPTextModel
from diffusion_tf.models.unet_2d_condition import UNet2DConditionModel
