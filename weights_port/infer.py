"""Reading the architecture of an original single-file checkpoint from its key shapes.

Shapes give channels, depths, context width and projection kind; head counts
cannot be read from shapes, so the standard settings are used (SD 1.x: 8 heads
per block; SD 2.x: 64 channels per head; CLIP: 64 channels per head). Anything
else needs `--config`. The prediction type (epsilon or v) is not in the weights
either: SD 2.x files default to v_prediction at 768 px (2.1), `--prediction-type
epsilon` or `--config sd-v2-1-base` for the 512 px base model.

SDXL single files (Stability's SGM layout: `conditioner.embedders.*`) are the base (CLIP
ViT-L and OpenCLIP bigG), its 9-channel inpainting variant, or the refiner (the bigG alone).
Their UNets take 64 channels per head (diffusers' SDXL configs store the head counts,
channels // 64, as `attention_head_dim`), the transformer depth per level is counted, and
the added-condition MLP's input (`label_emb.0.0`) is the pooled bigG embedding plus
`n` time ids of 256 sinusoidal features each: n = 6 (original size, crop corner, target
size) for the base, 5 (aesthetic score in place of the target size) for the refiner; the
count decides the pipeline flags. Files whose add_embedding input is not pooled + 5 or 6
x 256 (small test models) take n from the layout (6 with two encoders, 5 with one) and the
feature width from the shapes.
"""

import re

from weights_port.errors import CheckpointError
from weights_port.unet_keys import PREFIX as UNET
from weights_port.vae_keys import PREFIX as VAE
from weights_port.clip_keys import (
    HF_PREFIX, OPENCLIP_PREFIX, SGM_HF_PREFIX, SGM_OPENCLIP_PREFIX, SGM_REFINER_OPENCLIP_PREFIX,
)

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
# diffusers' SDXL scheduler (EulerDiscreteScheduler) in our scheduler section: the same training
# schedule, epsilon prediction.
SDXL_SCHEDULER = dict(SD_SCHEDULER, clip_sample=False)
SDXL_TIME_EMBED_DIM = 256  # sinusoidal features per time id (SGM's ConcatTimestepEmbedderND outdim)
SDXL_TIME_IDS = {"base": 6, "refiner": 5}
SDXL_PIPELINE = {
    "base": {"force_zeros_for_empty_prompt": True},
    "refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
}
SGM_PREFIX = "conditioner.embedders."


def _has(keys, prefix):
    return any(k.startswith(prefix) for k in keys)


def sdxl_variant(shapes):
    """'base' (CLIP ViT-L at conditioner.embedders.0.transformer.*, OpenCLIP bigG at
    conditioner.embedders.1.model.*; the inpainting model too) or 'refiner' (the bigG alone, at
    conditioner.embedders.0.model.*) for an SGM-layout file; else a CheckpointError saying
    which text encoder is where and which is missing."""
    keys = list(shapes)
    clip_l, big_g = _has(keys, SGM_HF_PREFIX), _has(keys, SGM_OPENCLIP_PREFIX)
    refiner_g = _has(keys, SGM_REFINER_OPENCLIP_PREFIX)
    if clip_l and big_g and not refiner_g:
        return "base"
    if refiner_g and not (clip_l or big_g or _has(keys, SGM_PREFIX + "1.")):
        return "refiner"
    found = [name for name, here in (
        (f"CLIP ViT-L ({SGM_HF_PREFIX}*)", clip_l), (f"OpenCLIP bigG ({SGM_OPENCLIP_PREFIX}*)", big_g),
        (f"OpenCLIP bigG ({SGM_REFINER_OPENCLIP_PREFIX}*)", refiner_g)) if here]
    embedders = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(SGM_PREFIX)})
    raise CheckpointError(
        "this SDXL (SGM-layout) checkpoint has "
        + (" and ".join(found) if found else f"no known text encoder (found {embedders[:4]})")
        + f"; an SDXL base file needs both CLIP ViT-L at {SGM_HF_PREFIX}* and OpenCLIP bigG at "
        f"{SGM_OPENCLIP_PREFIX}*, a refiner only OpenCLIP bigG at {SGM_REFINER_OPENCLIP_PREFIX}*."
    )


def describe(shapes):
    """'sd1', 'sd2', 'sdxl' (base, inpainting or refiner: `sdxl_variant`), or a
    CheckpointError saying what the file looks like."""
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
    if _has(keys, SGM_PREFIX):
        sdxl_variant(shapes)
        return "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(HF_PREFIX) for k in keys):
        return "sd1"
    raise CheckpointError(
        "the checkpoint has no text encoder (cond_stage_model.* or, SDXL, conditioner.embedders.*); "
        "a full model needs one."
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
    if family == "sdxl":
        return _sdxl_unet(shapes, levels, layers, channels, attention, conv_in, shapes[to_k][1])
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


def _depth(shapes, block):
    return _count(shapes, re.escape(UNET + block) + r"\.transformer_blocks\.(\d+)\.")


def _sdxl_unet(shapes, levels, layers, channels, attention, conv_in, cross):
    """SDXL's UNet: transformer depth per level (an int where every transformer has the same,
    as diffusers' refiner config; else a list with 1 at the levels without one, as the base's
    [1, 2, 10]), 64 channels per head, the added-condition MLP's input width."""
    depths = []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        depths.append(_depth(shapes, f"input_blocks.{first}.1") if attention[level] else None)
    middle = _depth(shapes, "middle_block.1")
    if attention[-1] and depths[-1] != middle:
        raise CheckpointError(
            f"the middle transformer has {middle} blocks but the last level's have {depths[-1]}; "
            "a diffusers UNet gives both the same depth (pass --config for anything else)."
        )
    distinct = {d for d in depths if d is not None} | {middle}
    if len(distinct) == 1:
        depth = middle
    else:
        depth = [d if d is not None else 1 for d in depths[:-1]] + [middle]
    label = UNET + "label_emb.0.0.weight"
    return {
        "sample_size": 128,
        "in_channels": conv_in[1],
        "out_channels": shapes[UNET + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": depth,
        "cross_attention_dim": cross,
        "attention_head_dim": [max(1, c // 64) for c in channels],
        "use_linear_projection": len(shapes[UNET + "middle_block.1.proj_in.weight"]) == 2,
        "upcast_attention": None,  # as diffusers' SDXL configs (the softmax runs in float32 anyway)
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": shapes[label][1],
    }


def _sdxl_time_ids(adm, pooled, variant):
    """(time ids, features per id) of an add_embedding input `adm` wide next to a `pooled`
    embedding: SDXL's 256 features and 6 (base) or 5 (refiner) ids where they fit, else the
    layout's count and the width that fits."""
    n, rest = divmod(adm - pooled, SDXL_TIME_EMBED_DIM)
    if not rest and n in SDXL_TIME_IDS.values():
        return n, SDXL_TIME_EMBED_DIM
    n = SDXL_TIME_IDS[variant]
    dim, rest = divmod(adm - pooled, n)
    if rest or dim < 1:
        raise CheckpointError(
            f"the UNet's added-condition input (label_emb.0.0.weight) is {adm} wide, which is not the "
            f"pooled text embedding ({pooled}) plus 5 or 6 time ids x {SDXL_TIME_EMBED_DIM} nor {n} x any "
            "width; pass --config with the model's diffusers configs."
        )
    return n, dim


def infer_sdxl_text_encoders(shapes, variant):
    """{"text_encoder": CLIP ViT-L (base only), "text_encoder_2": OpenCLIP bigG with its
    projection, every layer}, sizes from the shapes."""
    out = {}
    if variant == "base":
        out["text_encoder"] = infer_text_encoder(shapes, "sd1", SGM_HF_PREFIX)
    prefix = SGM_OPENCLIP_PREFIX if variant == "base" else SGM_REFINER_OPENCLIP_PREFIX
    big_g = infer_text_encoder(shapes, "sdxl", prefix)
    big_g["projection_dim"] = shapes[prefix + "text_projection"][1]
    big_g["eos_token_id"] = 2  # SDXL's text_encoder_2 config: pooled at the largest id (the end token)
    out["text_encoder_2"] = big_g
    return out


def infer_vae(shapes, prefix=VAE):
    """The AutoencoderKL config of the LDM-layout VAE under `prefix` (a stand-alone VAE file: "")."""
    levels = _count(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    layers = _count(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [shapes[f"{prefix}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes[prefix + "encoder.conv_in.weight"][1],
        "out_channels": shapes[prefix + "decoder.conv_out.weight"][0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": layers,
        "latent_channels": shapes[prefix + "post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    }


def infer_text_encoder(shapes, family, prefix=None):
    """A CLIP text tower's config: HF CLIP under `prefix` (SD 1.x: cond_stage_model.transformer.)
    for family "sd1", OpenCLIP under `prefix` (SD 2.x: cond_stage_model.model., without its
    last layer; "sdxl": every layer) otherwise."""
    if family == "sd1":
        prefix = prefix or HF_PREFIX
        token = next(k for k in shapes if k.startswith(prefix) and k.endswith("token_embedding.weight"))
        position = token.replace("token_embedding", "position_embedding")
        layers = _count(shapes, re.escape(prefix) + r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
        fc1 = next(k for k in shapes if k.startswith(prefix) and k.endswith("layers.0.mlp.fc1.weight"))
        act = "quick_gelu"
    else:
        prefix = prefix or OPENCLIP_PREFIX
        token = prefix + "token_embedding.weight"
        position = prefix + "positional_embedding"
        # SD 2.x conditions on the penultimate layer: the last one is not used. SDXL keeps all.
        layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.") - (family == "sd2")
        fc1 = prefix + "transformer.resblocks.0.mlp.c_fc.weight"
        act = "gelu"
    vocab, hidden = shapes[token]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[fc1][0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[position][0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }


def infer_sdxl(shapes):
    variant = sdxl_variant(shapes)
    configs = infer_sdxl_text_encoders(shapes, variant)
    unet = infer_unet(shapes, "sdxl")
    pooled = configs["text_encoder_2"]["projection_dim"]
    n, dim = _sdxl_time_ids(unet["projection_class_embeddings_input_dim"], pooled, variant)
    unet["addition_time_embed_dim"] = dim
    vae = dict(infer_vae(shapes), sample_size=1024, scaling_factor=0.13025)
    configs.update(unet=unet, vae=vae, scheduler=dict(SDXL_SCHEDULER))
    if variant == "base":
        configs["tokenizer"] = {"context_length": 77, "pad_token_id": 49407}  # pads with <|endoftext|>
    configs["tokenizer_2"] = {"context_length": 77, "pad_token_id": 0}  # pads with "!"
    configs["pipeline"] = dict(SDXL_PIPELINE["base" if n == SDXL_TIME_IDS["base"] else "refiner"])
    return configs


def infer_configs(shapes):
    """Diffusers-style configs of every component, from {key: shape}."""
    family = describe(shapes)
    try:
        if family == "sdxl":
            return infer_sdxl(shapes)
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
