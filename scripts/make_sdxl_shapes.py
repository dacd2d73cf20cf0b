"""Write tests/fixtures/sdxl-shapes/<name>.shapes.json.gz: {key: shape} of Stability's SDXL single
files (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors) without downloading them.

The official diffusers configs of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 are
kept beside (tests/fixtures/sdxl-shapes/<name>/*/config.json, model_index.json, the tokenizers'
pad tokens). For each, diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
CLIPTextModel / CLIPTextModelWithProjection are built from those configs on torch's meta device
(no memory, no data); their keys are named as in the SGM file by weights_port's own key
functions (unet_keys.original_key, vae_keys.original_key, clip_keys.openclip_key and the
HF prefix), shapes as the file stores them: q/k/v fused into in_proj, text_projection
transposed, the VAE's mid attention as 1x1 convolutions. Plus the non-weight entries the real
files carry (the ViT-L's position_ids, the bigG's logit_scale).

Then, independently of our tables, the result is checked against diffusers' own single-file
converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint run on meta tensors of those shapes): they must give back every key
and shape of the diffusers models, and nothing else.

    python scripts/make_sdxl_shapes.py        # needs torch, diffusers, transformers; a few seconds

Run it in a process without TensorFlow (it imports only weights_port's key modules).
"""

import gzip
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sdxl-shapes")
NAMES = ("sd_xl_base_1.0", "sd_xl_refiner_1.0")

import torch  # noqa: E402  (before anything else heavy)

sys.path.insert(0, ROOT)
from weights_port import clip_keys, unet_keys, vae_keys  # noqa: E402


def _config(name, component):
    path = os.path.join(OUT, name, component, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _bare(key):
    return key[len("text_model."):] if key.startswith("text_model.") else key


def sgm_shapes(name):
    """({SGM key: shape}, {component: {diffusers key: shape}}) for the official configs of `name`."""
    import diffusers
    import transformers

    unet_cfg, vae_cfg = _config(name, "unet"), _config(name, "vae")
    clip_l, big_g = _config(name, "text_encoder"), _config(name, "text_encoder_2")
    with torch.device("meta"):
        models = {
            "unet": diffusers.UNet2DConditionModel.from_config(unet_cfg),
            "vae": diffusers.AutoencoderKL.from_config(vae_cfg),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**big_g)),
        }
        if clip_l is not None:
            models["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_l))
    theirs = {c: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("position_ids")}
              for c, m in models.items()}

    shapes = {}
    for key, shape in theirs["unet"].items():
        shapes[unet_keys.original_key(key, unet_cfg)] = shape
    for key, shape in theirs["vae"].items():
        target = vae_keys.original_key(key, vae_cfg)
        if ".mid.attn_1." in target and target.endswith("weight") and len(shape) == 2:
            shape = shape + (1, 1)  # stored as 1x1 convolutions
        shapes[target] = shape
    if "text_encoder" in theirs:
        for key, shape in theirs["text_encoder"].items():
            shapes[clip_keys.SGM_HF_PREFIX + "text_model." + _bare(key)] = shape
        shapes[clip_keys.SGM_HF_PREFIX + "text_model.embeddings.position_ids"] = (1, clip_l["max_position_embeddings"])
        prefix = clip_keys.SGM_OPENCLIP_PREFIX
    else:
        prefix = clip_keys.SGM_REFINER_OPENCLIP_PREFIX
    for key, source in clip_keys.openclip_table(list(theirs["text_encoder_2"]), prefix).items():
        shape = theirs["text_encoder_2"][key]
        if source.transpose:
            shape = shape[::-1]
        if source.split is not None:
            shape = (shape[0] * source.split[1],) + shape[1:]
        shapes[source.keys[0]] = shape
    shapes[prefix + "logit_scale"] = ()
    return shapes, theirs, (unet_cfg, vae_cfg, big_g)


def check_with_diffusers(shapes, theirs, configs):
    """diffusers' single-file converters read `shapes` back into exactly the diffusers models' keys."""
    from diffusers.loaders import single_file_utils as sfu
    import transformers

    unet_cfg, vae_cfg, big_g = configs
    checkpoint = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg),
        "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg),
    }
    if "text_encoder" in theirs:
        got["text_encoder"] = {
            _bare(k): v for k, v in sfu.convert_ldm_clip_checkpoint(checkpoint).items() if not k.endswith("position_ids")
        }
        prefix = clip_keys.SGM_OPENCLIP_PREFIX
    else:
        prefix = clip_keys.SGM_REFINER_OPENCLIP_PREFIX
    with torch.device("meta"):
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**big_g))
    open_clip = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    got["text_encoder_2"] = {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in open_clip.items()
    }
    for component, want in theirs.items():
        if component == "text_encoder":
            want = {_bare(k): v for k, v in want.items()}
        have = {k: tuple(v.shape) for k, v in got[component].items()}
        if component == "vae":  # diffusers reshapes the 1x1-conv attention to linear itself
            have = {k: (v[:2] if "mid_block.attentions" in k and len(v) == 4 else v) for k, v in have.items()}
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))[:10]
            raise SystemExit(f"{component}: diffusers reads the shapes back differently: {diff}")


def main():
    for name in NAMES:
        shapes, theirs, configs = sgm_shapes(name)
        check_with_diffusers(shapes, theirs, configs)
        path = os.path.join(OUT, f"{name}.shapes.json.gz")
        data = json.dumps({k: list(shapes[k]) for k in sorted(shapes)}, separators=(",", ":")).encode()
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(data)
        print(f"{path}: {len(shapes)} tensors, {os.path.getsize(path)} bytes "
              "(diffusers' converters agree)")


if __name__ == "__main__":
    main()
