"""TAESD key table: diffusers AutoencoderTiny names <-> madebyollin's original files.

madebyollin's taesd.py stores the encoder and the decoder as two `nn.Sequential` state dicts
(`taesd_encoder.pth` / `.safetensors`, `taesd_decoder.*`), keyed by the entry's index:
`<i>.weight` for a convolution, `<i>.conv.<j>.weight` for a block's convolutions. diffusers
keeps the same entries under `encoder.layers.<i>` and `decoder.layers.<i>`, except that the
original decoder begins with its parameterless tanh clamp (entry 0), which diffusers applies
outside the Sequential: original decoder entry i + 1 is diffusers' `decoder.layers.<i>`.

The architecture is read from the entries (`infer_config`): a convolution with a bias opens the
encoder (image -> width) and closes it (width -> latents); each further level starts with a
stride-2 convolution without bias, followed by its blocks. The decoder opens with a convolution
(latents -> width) and its activation, then per level its blocks and, but for the last level,
an upsampling and a convolution without bias; the last level ends with the convolution (with
bias) to the image. Whether those guesses hold is checked by building the network and matching
every key and shape.
"""

import re

from weights_port.errors import CheckpointError

ENCODER, DECODER = "encoder.layers.", "decoder.layers."
_ENTRY = re.compile(r"(\d+)\.(.+)")
ORIGINAL_KEY = re.compile(r"^\d+\.(\w+\.)*(weight|bias)$")  # an nn.Sequential's entries (`3.conv.4.bias`)
DECODER_OFFSET = 1  # the original decoder's entry 0 is the clamp


def is_original(keys):
    """Whether every key is an original TAESD Sequential entry (`3.conv.4.bias`, `14.weight`)."""
    keys = list(keys)
    return bool(keys) and all(ORIGINAL_KEY.match(k) for k in keys)


def is_original_decoder(keys):
    """An original decoder file has no entry 0 (the clamp); an encoder file opens with `0.weight`."""
    return "0.weight" not in set(keys)


def from_original(encoder, decoder, where=("encoder file", "decoder file")):
    """{diffusers key: tensor} from the two original state dicts (mappings of views; nothing copied)."""
    out = {}
    for key, value in encoder.items():
        out[ENCODER + key] = value
    for key, value in decoder.items():
        index, rest = _ENTRY.match(key).groups()
        if int(index) < DECODER_OFFSET:
            raise CheckpointError(f"{where[1]}: {key} is entry {index}, the decoder's parameterless clamp.")
        out[f"{DECODER}{int(index) - DECODER_OFFSET}.{rest}"] = value
    return out


def to_original(state):
    """(encoder, decoder) original state dicts from diffusers-named weights (the inverse)."""
    encoder, decoder = {}, {}
    for key, value in state.items():
        if key.startswith(ENCODER):
            encoder[key[len(ENCODER):]] = value
        elif key.startswith(DECODER):
            index, rest = _ENTRY.match(key[len(DECODER):]).groups()
            decoder[f"{int(index) + DECODER_OFFSET}.{rest}"] = value
        else:
            raise KeyError(key)
    return encoder, decoder


def _entries(shapes, prefix):
    """{index: ("conv", has_bias, weight shape) | ("block", conv.0 weight shape)} of one side."""
    out = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        m = re.match(r"(\d+)\.(conv\.0\.weight|weight|bias)$", key[len(prefix):])
        if not m:
            continue
        i, name = int(m.group(1)), m.group(2)
        if name == "conv.0.weight":
            out[i] = ("block", tuple(shape))
        elif name == "weight":
            out[i] = ("conv", f"{prefix}{i}.bias" in shapes, tuple(shape))
    return dict(sorted(out.items()))


def infer_config(shapes):
    """The AutoencoderTiny config (diffusers' fields) of diffusers-named TAESD weights {key: shape};
    the act_fn (ReLU) and upsampling factor (2) are taesd.py's, as no weight records them."""
    enc, dec = _entries(shapes, ENCODER), _entries(shapes, DECODER)
    if not enc or not dec:
        raise CheckpointError(
            f"TAESD weights need both an encoder and a decoder; found {len(enc)} encoder and {len(dec)} decoder entries."
        )
    enc_items, dec_items = list(enc.values()), list(dec.values())
    first, last = enc_items[0], enc_items[-1]
    if first[0] != "conv" or last[0] != "conv" or dec_items[0][0] != "conv" or dec_items[-1][0] != "conv":
        raise CheckpointError("TAESD weights: the encoder and the decoder must each begin and end with a convolution.")
    channels, blocks = [], []
    for kind, *rest in enc_items[:-1]:
        if kind == "conv":  # the first (with bias) or a stride-2 one (without): a new level
            channels.append(rest[1][0])
            blocks.append(0)
        else:
            blocks[-1] += 1
    dec_channels, dec_blocks = [dec_items[0][2][0]], [0]
    for kind, *rest in dec_items[1:-1]:
        if kind == "block":
            dec_blocks[-1] += 1
        else:  # the convolution after an upsampling: the next level
            dec_channels.append(rest[1][0])
            dec_blocks.append(0)
    return {
        "in_channels": first[2][1],
        "out_channels": dec_items[-1][2][0],
        "encoder_block_out_channels": channels,
        "decoder_block_out_channels": dec_channels,
        "num_encoder_blocks": blocks,
        "num_decoder_blocks": dec_blocks,
        "latent_channels": last[2][0],
        "act_fn": "relu",
        "upsampling_scaling_factor": 2,
        "latent_magnitude": 3,
        "latent_shift": 0.5,
        "scaling_factor": 1.0,
    }
