"""Text-encoder key tables: transformers CLIPTextModel names -> checkpoint names.

SD 1.x single files hold the HF CLIP model under `cond_stage_model.transformer.`
(with or without the `text_model.` level, by transformers version). SD 2.x files
hold OpenCLIP under `cond_stage_model.model.`: `token_embedding`,
`positional_embedding`, `transformer.resblocks.<i>.{ln_1, attn.in_proj_*, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, where in_proj fuses q, k and v (split
into thirds). Diffusers folders written by transformers 5 may drop `text_model.`.

SDXL single files (Stability's SGM layout) hold the same towers under `conditioner.embedders.<i>.`:
the base's CLIP ViT-L as HF CLIP at `conditioner.embedders.0.transformer.` and its OpenCLIP bigG at
`conditioner.embedders.1.model.`; the refiner only the bigG, at `conditioner.embedders.0.model.`.
The bigG keeps all its layers and its `text_projection` [hidden, projection], the transpose of
transformers' `text_projection.weight` (read with the key table's transpose operation).
"""

import re

from weights_port.key_table import Source

HF_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SGM_HF_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP bigG
SGM_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP bigG, alone
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

# Checkpoint entries that are not weights of the text encoder we build.
UNUSED = (
    r".*position_ids$",
    r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)$",
    r"(text_model\.)?text_projection\.weight$",
    r"logit_scale$",
)


def _bare(key):
    return key[len("text_model."):] if key.startswith("text_model.") else key


def hf_table(keys, prefix=""):
    return {key: Source((prefix + key, prefix + _bare(key))) for key in keys}


def openclip_key(key, prefix=OPENCLIP_PREFIX):
    """(OpenCLIP key, split) for a transformers CLIPTextModel key (not `text_projection`, see
    `openclip_table`)."""
    bare = _bare(key)
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if bare in fixed:
        return prefix + fixed[bare], None
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", bare)
    if not m:
        raise KeyError(f"no OpenCLIP key for {key!r}")
    i, module, param = m.group(1), m.group(2), m.group(3)
    base = f"{prefix}transformer.resblocks.{i}."
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if module in qkv:
        return f"{base}attn.in_proj_{param}", (qkv[module], 3)
    return f"{base}{OPENCLIP_LAYER[module]}.{param}", None


def openclip_table(keys, prefix=OPENCLIP_PREFIX):
    """OpenCLIP names under `prefix` for transformers CLIPTextModel(WithProjection) keys; the
    projection's `text_projection.weight` is the transposed `<prefix>text_projection`."""
    out = {}
    for key in keys:
        if _bare(key) == "text_projection.weight":
            out[key] = Source((prefix + "text_projection",), transpose=True)
            continue
        source, split = openclip_key(key, prefix)
        out[key] = Source((source,), split)
    return out
