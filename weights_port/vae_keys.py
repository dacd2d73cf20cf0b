"""VAE key table: diffusers AutoencoderKL names -> original names (`first_stage_model.*`).

Original layout (taming / ldm `Encoder` / `Decoder`): `encoder.down.<i>.block.<j>`,
`encoder.down.<i>.downsample.conv`, `{en,de}coder.mid.block_1 / attn_1 / block_2`,
`decoder.up.<n-1-i>.block.<j>` (the decoder's levels are numbered from the bottom),
`norm_out`, `nin_shortcut`, and the mid attention's `norm, q, k, v, proj_out` as 1x1
convolutions. Older diffusers folders name that attention `query, key, value, proj_attn`.
"""

import re

from weights_port.key_table import Source

PREFIX = "first_stage_model."
ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
LEGACY_ATTENTION = {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _split_attention(rest):
    for ours in ATTENTION:
        if rest.startswith(ours + "."):
            return ours, rest[len(ours) + 1:]
    raise KeyError(rest)


def original_key(key, config):
    n = len(config["block_out_channels"])
    rename = {"conv_norm_out.": "norm_out.", "conv_shortcut.": "nin_shortcut."}
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return PREFIX + key  # quant_conv, post_quant_conv
    side, rest = m.groups()
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if m:
        kind, i, part, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = i if kind == "down" else n - 1 - i
        if part == "resnets":
            tail = tail.replace("conv_shortcut.", "nin_shortcut.")
            return f"{PREFIX}{side}.{kind}.{level}.block.{j}.{tail}"
        return f"{PREFIX}{side}.{kind}.{level}.{kind}sample.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest)
    if m:
        part, j, tail = m.groups()
        if part == "resnets":
            return f"{PREFIX}{side}.mid.block_{int(j) + 1}.{tail}"
        ours, param = _split_attention(tail)
        return f"{PREFIX}{side}.mid.attn_1.{ATTENTION[ours]}.{param}"
    for ours, theirs in rename.items():
        if rest.startswith(ours):
            return f"{PREFIX}{side}.{theirs}{rest[len(ours):]}"
    return f"{PREFIX}{side}.{rest}"


def table(keys, config):
    return {key: Source((original_key(key, config),)) for key in keys}


def diffusers_table(keys):
    """Diffusers folders: the same names, or the legacy attention names."""
    out = {}
    for key in keys:
        m = re.match(r"(.*mid_block\.attentions\.0\.)(.*)", key)
        if m:
            ours, param = _split_attention(m.group(2))
            legacy = f"{m.group(1)}{LEGACY_ATTENTION[ours]}.{param}"
            out[key] = Source((key, legacy))
        else:
            out[key] = Source((key,))
    return out
