"""The tiny random-weight models of tests/fixtures/<name>/ as real checkpoint files.

The fixtures hold only configs and reference outputs; the weights are recreated
here from `random_weights` (the same values the fixture script loaded into
diffusers) and written as a diffusers folder, an original single-file
.safetensors, or an original .ckpt, so the converter is tested on every format
without PyTorch.
"""

import functools
import json
import os
import shutil

import numpy as np

from support.random_weights import random_state_dict, random_tensor
from support.torch_format import save_torch_zip

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
NAMES = ("tiny-sd1", "tiny-sd2")
SDXL_NAMES = ("tiny-sdxl", "tiny-sdxl-refiner", "tiny-sdxl-inpaint")
SDXL_SOURCES = ("diffusers", "sgm")  # a diffusers folder; an SGM single file (write_single_file)


def fixture_dir(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    with np.load(os.path.join(fixture_dir(name), "reference.npz")) as f:
        ref = {k: f[k] for k in f.files}
    with open(os.path.join(fixture_dir(name), "reference.json")) as f:
        ref["meta"] = json.load(f)
    return ref


def build_models(name):
    from weights_port.convert import build_models, folder_configs

    configs = folder_configs(fixture_dir(name))
    return configs, build_models(configs)


@functools.lru_cache(maxsize=None)
def weights(name):
    """{component: {diffusers key: array}} with the fixture's random values."""
    from diffusion_tf.state_dict import named_variables

    configs, models = build_models(name)
    out = {}
    for component, model in models.items():
        shapes = {}
        for key, (var, perm) in named_variables(model).items():
            shape = tuple(var.shape)
            shapes[key] = tuple(shape[p] for p in perm) if perm else shape
        out[component] = random_state_dict(shapes)
    return configs, models, out


def write_diffusers_folder(name, dst):
    from safetensors.numpy import save_file

    from diffusion_tf.clip_tokenizer import CLIPTokenizer

    _, _, state = weights(name)
    src = fixture_dir(name)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(src, sub)):
            shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
    for sub in ("tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(dst, sub)):
            CLIPTokenizer().save_vocabulary(os.path.join(dst, sub))
    for component in state:
        filename = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_file(state[component], os.path.join(dst, component, filename))
    if os.path.isfile(os.path.join(src, "model_index.json")):
        shutil.copy(os.path.join(src, "model_index.json"), dst)
    else:
        with open(os.path.join(dst, "model_index.json"), "w") as f:
            json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return dst


def original_state_dict(name):
    """The tiny model in the original single-file layout (with the usual extra entries): LDM for
    SD 1.x/2.x, Stability's SGM layout for SDXL (`sgm_state_dict`)."""
    if name in SDXL_NAMES:
        return sgm_state_dict(name)
    from weights_port.convert import original_tables
    from weights_port.key_table import invert

    configs, models, state = weights(name)
    tables = original_tables(models, configs)
    out = {}
    for component in ("unet", "vae", "text_encoder"):
        out.update(invert(tables[component], state[component]))
    # Entries real files carry that are not weights of our networks.
    out["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype="float32")
    if configs["text_encoder"]["hidden_act"] == "gelu":  # OpenCLIP: one more layer, projection
        hidden = configs["text_encoder"]["hidden_size"]
        inner = configs["text_encoder"]["intermediate_size"]
        base = f"cond_stage_model.model.transformer.resblocks.{configs['text_encoder']['num_hidden_layers']}."
        for key, shape in {
            "ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "attn.in_proj_weight": (3 * hidden, hidden),
            "attn.in_proj_bias": (3 * hidden,), "attn.out_proj.weight": (hidden, hidden),
            "attn.out_proj.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
            "mlp.c_fc.weight": (inner, hidden), "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (hidden, inner), "mlp.c_proj.bias": (hidden,),
        }.items():
            out[base + key] = random_tensor(base + key, shape)
        out["cond_stage_model.model.text_projection"] = random_tensor("proj", (hidden, 32))
        out["cond_stage_model.model.logit_scale"] = np.array(4.6, dtype="float32")
    else:
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    return out


def sgm_state_dict(name):
    """An SDXL tiny model as sd_xl_base_1.0.safetensors / sd_xl_refiner_1.0.safetensors lay it
    out: model.diffusion_model.* (label_emb too), first_stage_model.*, the base's
    conditioner.embedders.0.transformer.text_model.* (CLIP ViT-L) and .1.model.* (OpenCLIP bigG,
    fused in_proj, every layer, text_projection [hidden, projection]), the refiner's bigG at
    conditioner.embedders.0.model.*, plus the entries real files carry that are not weights
    (the ViT-L's position_ids, the bigG's logit_scale). No model_ema, no DDPM buffers."""
    from weights_port.convert import original_tables
    from weights_port.key_table import invert

    configs, models, state = weights(name)
    tables = original_tables(models, configs)
    out = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component in state:
            out.update(invert(tables[component], state[component]))
    if "text_encoder" in state:
        out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
        big_g = "conditioner.embedders.1.model."
    else:
        big_g = "conditioner.embedders.0.model."
    out[big_g + "logit_scale"] = np.array(4.6052, dtype="float32")
    return out


def write_single_file(name, path):
    """Write the original-layout checkpoint as .safetensors or .ckpt (by extension)."""
    tensors = original_state_dict(name)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    else:
        save_torch_zip(tensors, path, wrap_in_state_dict=True, extra={"global_step": 470000})
    return path


@functools.lru_cache(maxsize=None)
def converted_folder(name="tiny-sd1"):
    """A model folder of the tiny model, converted once per test session."""
    import atexit
    import tempfile

    from weights_port.convert import convert_checkpoint

    root = tempfile.mkdtemp(prefix="diffusion_tf_tiny_")
    atexit.register(shutil.rmtree, root, True)
    src = write_diffusers_folder(name, os.path.join(root, "diffusers"))
    return convert_checkpoint(src, os.path.join(root, "model"), log=lambda *_: None)
