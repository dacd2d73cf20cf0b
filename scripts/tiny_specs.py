"""Architectures of the tiny random-weight models used by the parity tests.

Each spec is the non-default part of the diffusers / transformers configs; the
fixture script builds the reference models from them and saves their full
configs under tests/fixtures/<name>/, which is what our tests read.
"""

TINY_SPECS = {
    "tiny-sd1": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[32, 64, 64],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        "vae": dict(
            block_out_channels=[32, 32, 64, 64],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        "scheduler": dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        ),
        "pad_token": "<|endoftext|>",
    },
    "tiny-sd2": {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[32, 64, 64],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=48,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            upcast_attention=True,
        ),
        "vae": dict(
            block_out_channels=[32, 32, 64, 64],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
        ),
        "text_encoder": dict(
            vocab_size=49408,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        "scheduler": dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        "pad_token": "!",
    },
}

# The 9-channel inpainting variant of tiny-sd1 (latents + mask + masked-image latents as the
# UNet input, as the SD inpainting checkpoints); everything else as tiny-sd1. Its fixtures
# (tests/fixtures/tiny-sd1-inpaint/) come from scripts/make_editing_fixtures.py. Kept out of
# TINY_SPECS: the text-to-image fixture script cannot run a 9-channel UNet.
EDITING_SPECS = {
    "tiny-sd1-inpaint": {
        **TINY_SPECS["tiny-sd1"],
        "unet": {**TINY_SPECS["tiny-sd1"]["unet"], "in_channels": 9},
    },
}

# Tiny SDXL-like models (scripts/make_sdxl_fixtures.py writes their configs and reference outputs
# under tests/fixtures/<name>/). "tiny-sdxl": two text encoders of different widths (CLIP ViT-L-like
# 32 wide, then an OpenCLIP-bigG-like 48 wide with a 24-wide projection), a first down level without
# attention and per-block transformer depths, micro-conditioning of 6 values. "tiny-sdxl-refiner": the
# second encoder only (the same as tiny-sdxl's, as the real refiner shares the base's), 4 levels, the
# aesthetic score (5 values). "tiny-sdxl-inpaint": tiny-sdxl with a 9-channel UNet.
_SDXL_TEXT_1 = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu",
)
_SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=24,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as SDXL's text_encoder_2: pooled at argmax(ids)
)
_SDXL_VAE = dict(
    block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32,
    sample_size=64, scaling_factor=0.13025, force_upcast=True,
)
_SDXL_SCHEDULER = dict(  # SDXL's EulerDiscreteScheduler config
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
    timestep_spacing="leading", steps_offset=1, interpolation_type="linear", use_karras_sigmas=False,
    clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0,
)
SDXL_SPECS = {
    "tiny-sdxl": {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=2,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 3], attention_head_dim=[2, 4, 8], cross_attention_dim=80,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        ),
        "vae": _SDXL_VAE,
        "text_encoder": _SDXL_TEXT_1,
        "text_encoder_2": _SDXL_TEXT_2,
        "scheduler": _SDXL_SCHEDULER,
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
        "pipeline": dict(force_zeros_for_empty_prompt=True),
    },
    "tiny-sdxl-refiner": {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=2, attention_head_dim=[2, 4, 4, 8], cross_attention_dim=48,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 5 * 8,
        ),
        "vae": _SDXL_VAE,
        "text_encoder": None,
        "text_encoder_2": _SDXL_TEXT_2,
        "scheduler": _SDXL_SCHEDULER,
        "pad_token_2": "!",
        "pipeline": dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True),
    },
}
SDXL_SPECS["tiny-sdxl-inpaint"] = {
    **SDXL_SPECS["tiny-sdxl"],
    "unet": {**SDXL_SPECS["tiny-sdxl"]["unet"], "in_channels": 9},
}

# A guidance-distilled (LCM-like) variant of tiny-sd1: the UNet embeds the guidance scale
# (`time_cond_proj_dim`, 256 in the LCM checkpoints; 16 here) and the folder's scheduler is
# diffusers' LCMScheduler. Its fixtures (tests/fixtures/tiny-lcm/) come from
# scripts/make_lcm_fixtures.py; the VAE and text encoder are tiny-sd1's (the same random
# values: they are drawn from the keys).
LCM_SPECS = {
    "tiny-lcm": {
        **TINY_SPECS["tiny-sd1"],
        "unet": {**TINY_SPECS["tiny-sd1"]["unet"], "time_cond_proj_dim": 16},
        "scheduler": {**TINY_SPECS["tiny-sd1"]["scheduler"], "original_inference_steps": 50,
                      "timestep_scaling": 10.0},
    },
}
