"""Text-encoder key tables: transformers CLIPTextModel names -> checkpoint names.

SD 1.x single files hold the HF CLIP model under `cond_stage_model.transformer.`
(with or without the `text_model.` level, by transformers version). SD 2.x files
hold OpenCLIP under `cond_stage_model.model.`: `token_embedding`,
`positional_embedding`, `transformer.resblocks.<i>.{ln_1, attn.in_proj_*, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, where in_proj fuses q, k and v (split
into thirds). Diffusers folders written by transformers 5 may drop `text_model.`.
"""

import re

from weights_port.key_table import Source

HF_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
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


def openclip_key(key):
    """(OpenCLIP key, split) for a transformers CLIPTextModel key."""
    bare = _bare(key)
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if bare in fixed:
        return OPENCLIP_PREFIX + fixed[bare], None
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", bare)
    i, module, param = m.group(1), m.group(2), m.group(3)
    base = f"{OPENCLIP_PREFIX}transformer.resblocks.{i}."
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if module in qkv:
        return f"{base}attn.in_proj_{param}", (qkv[module], 3)
    return f"{base}{OPENCLIP_LAYER[module]}.{param}", None


def openclip_table(keys):
    out = {}
    for key in keys:
        source, split = openclip_key(key)
        out[key] = Source((source,), split)
    return out
