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
