"""Building blocks shared by the CLIP text model, the UNet and the VAE."""

from diffusion_tf.layers.attention import Attention
from diffusion_tf.layers.linear_attention import LinearAttention
from diffusion_tf.layers.resnet_block import ResnetBlock2D
from diffusion_tf.layers.sampling import Downsample2D, Upsample2D
from diffusion_tf.layers.spatial_attention import SpatialAttention
from diffusion_tf.layers.transformer_2d import BasicTransformerBlock, Transformer2D
from diffusion_tf.layers.unet_blocks import DownBlock, MidBlock, UpBlock
from diffusion_tf.layers.embeddings import TimestepEmbedding, timestep_features
