"""Reading the architecture of an original single-file checkpoint from its key shapes.

Shapes give channels, depths, context width and projection kind; head counts
cannot be read from shapes, so the standard settings are used (SD 1.x: 8 heads
per block; SD 2.x: 64 channels per head; CLIP: 64 channels per head). Anything
else needs `--config`. The prediction type (epsilon or v) is not in the weights
either: SD 2.x files default to v_prediction at 768 px (2.1), `--prediction-type
epsilon` or `--config sd-v2-1-base` for the 512 px base model.
"""

import re

from weights_port.errors import CheckpointError
from weights_port.unet_keys import PREFIX as UNET
from weights_port.vae_keys import PREFIX as VAE
from weights_port.clip_keys import HF_PREFIX, OPENCLIP_PREFIX

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


def describe(shapes):
    """'sd1', 'sd2', or a CheckpointError saying what the file looks like."""
    keys = list(shapes)
    if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        raise CheckpointError(
            "this file looks like a LoRA (lora_* keys), not a full Stable Diffusion model; "
            "LoRA files cannot be converted on their own."
        )
    has_unet = any(k.startswith(UNET) for k in keys)
    has_vae = any(k.startswith(VAE) for k in keys)
    if not has_unet:
        raise CheckpointError(
            f"no UNet weights ({UNET}*) in this checkpoint: it is not an original-format "
            f"Stable Diffusion single file (first keys: {keys[:3]})."
        )
    if not has_vae:
        raise CheckpointError(
            f"the checkpoint has a UNet but no VAE ({VAE}*); a full model needs both."
        )
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(HF_PREFIX) for k in keys):
        return "sd1"
    raise CheckpointError(
        "the checkpoint has no text encoder (cond_stage_model.*); a full model needs one."
    )


def _count(shapes, pattern):
    return len({m.group(1) for k in shapes for m in [re.match(pattern, k)] if m})


def infer_unet(shapes, family):
    conv_in = shapes[UNET + "input_blocks.0.0.weight"]
    input_blocks = _count(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    ops = sorted(
        int(m.group(1)) for k in shapes for m in [re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight", k)] if m
    )
    levels = len(ops) + 1
    layers = (input_blocks - 1 - len(ops)) // levels
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(shapes[f"{UNET}input_blocks.{first}.0.out_layers.3.weight"][0])
        attention.append(f"{UNET}input_blocks.{first}.1.proj_in.weight" in shapes)
    proj_in = next(k for k in shapes if k.startswith(UNET) and k.endswith("proj_in.weight"))
    to_k = next(k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    linear = len(shapes[proj_in]) == 2
    heads = 8 if family == "sd1" else [c // 64 for c in channels]
    return {
        "sample_size": 64 if family == "sd1" else 96,
        "in_channels": conv_in[1],
        "out_channels": shapes[UNET + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": shapes[to_k][1],
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "upcast_attention": family == "sd2",
    }


def infer_vae(shapes):
    levels = _count(shapes, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    layers = _count(shapes, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [shapes[f"{VAE}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes[VAE + "encoder.conv_in.weight"][1],
        "out_channels": shapes[VAE + "decoder.conv_out.weight"][0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": layers,
        "latent_channels": shapes[VAE + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    }


def infer_text_encoder(shapes, family):
    if family == "sd1":
        token = next(k for k in shapes if k.startswith(HF_PREFIX) and k.endswith("token_embedding.weight"))
        position = token.replace("token_embedding", "position_embedding")
        layers = _count(shapes, re.escape(HF_PREFIX) + r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
        fc1 = next(k for k in shapes if k.startswith(HF_PREFIX) and k.endswith("layers.0.mlp.fc1.weight"))
        act = "quick_gelu"
    else:
        token = OPENCLIP_PREFIX + "token_embedding.weight"
        position = OPENCLIP_PREFIX + "positional_embedding"
        # SD 2.x conditions on the penultimate layer: the last one is not used.
        layers = _count(shapes, re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.") - 1
        fc1 = OPENCLIP_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"
        act = "gelu"
    vocab, hidden = shapes[token]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[fc1][0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": shapes[position][0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }


def infer_configs(shapes):
    """Diffusers-style configs of every component, from {key: shape}."""
    family = describe(shapes)
    try:
        return {
            "text_encoder": infer_text_encoder(shapes, family),
            "unet": infer_unet(shapes, family),
            "vae": infer_vae(shapes),
            "scheduler": dict(
                SD_SCHEDULER, prediction_type="epsilon" if family == "sd1" else "v_prediction"
            ),
            "tokenizer": {"pad_token_id": 49407 if family == "sd1" else 0, "context_length": 77},
        }
    except (KeyError, StopIteration, IndexError) as e:
        raise CheckpointError(
            f"cannot read the architecture of this {family} checkpoint from its keys "
            f"(missing {e}); pass --config with a diffusers-style folder or a preset."
        ) from None
