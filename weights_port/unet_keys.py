"""UNet key table: diffusers names -> original LDM names (`model.diffusion_model.*`).

Original layout (latent-diffusion's openaimodel.UNetModel):
    input_blocks.0.0                     conv_in
    input_blocks.<k>.0 / .1              resnet / transformer of a down level
    input_blocks.<k>.0.op                the down level's downsampler
    middle_block.0 / .1 / .2             resnet, transformer, resnet
    output_blocks.<k>.0 / .1 / .{1|2}    resnet / transformer / upsampler
    time_embed.0 / .2, out.0 / .2        time MLP, final norm and conv
    label_emb.0.0 / .0.2                 SDXL's added-condition MLP (our add_embedding)
with <k> counting resnets (+1 per downsampler) across levels. Everything is read from
the diffusers config: resnets per level (`layers_per_block`), which levels have a
transformer (`down_block_types` / `up_block_types`: SDXL's first level has none, the
refiner's last neither), so the upsampler is `.2` after a transformer and `.1` without;
the transformer depth only numbers `transformer_blocks.<t>`, the same in both layouts.
"""

import re

from weights_port.key_table import Source

PREFIX = "model.diffusion_model."
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest):
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def _layers(config):
    n = len(config["block_out_channels"])
    lpb = config.get("layers_per_block", 2)
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def original_key(key, config):
    """The LDM key of diffusers UNet key `key` for a UNet with diffusers `config`."""
    layers = _layers(config)
    up_layers = list(reversed(layers))
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return PREFIX + theirs + key[len(ours):]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            k = 1 + sum(n + 1 for n in layers[:i])
            if part == "resnets":
                return f"{PREFIX}input_blocks.{k + j}.0.{_resnet(rest)}"
            if part == "attentions":
                return f"{PREFIX}input_blocks.{k + j}.1.{rest}"
            return f"{PREFIX}input_blocks.{k + layers[i]}.0.op.{rest.partition('.')[2]}"
        k = sum(n + 1 for n in up_layers[:i])
        if part == "resnets":
            return f"{PREFIX}output_blocks.{k + j}.0.{_resnet(rest)}"
        if part == "attentions":
            return f"{PREFIX}output_blocks.{k + j}.1.{rest}"
        return f"{PREFIX}output_blocks.{k + up_layers[i]}.{2 if up_attention[i] else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"{PREFIX}middle_block.1.{rest}"
        return f"{PREFIX}middle_block.{2 * j}.{_resnet(rest)}"
    raise KeyError(f"no original UNet key for {key!r}")


def table(keys, config):
    return {key: Source((original_key(key, config),)) for key in keys}


def diffusers_table(keys):
    return {key: Source((key,)) for key in keys}
