"""Small LoRA and embedding files for the program tests: kohya keys for the built-in shapes model
(its cross-attention K/V and a self-attention Q of up_blocks.1, rank 2, large enough to change an
image visibly), or the tiny-sd1 fixture's kohya file when the shapes model is not installed."""

import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kohya module -> torch weight shape [out, in] in the shapes model
SHAPES_MODULES = {
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (32, 64),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
}


def write_lora(path, model="shapes", seed=0):
    """A LoRA file for `model` ("shapes", else a tiny-sd1 folder) at `path`; returns `path`."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if model != "shapes":
        shutil.copyfile(os.path.join(HERE, "fixtures", "lora", "kohya_locon.safetensors"), path)
        return path
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, (out, inn) in SHAPES_MODULES.items():
        tensors[key + ".lora_down.weight"] = rng.normal(0, 0.5, (2, inn)).astype("float32")
        tensors[key + ".lora_up.weight"] = rng.normal(0, 0.5, (out, 2)).astype("float32")
        tensors[key + ".alpha"] = np.array(2.0, "float32")
    save_file(tensors, path)
    return path


def write_embedding(path, width=64, vectors=2, seed=0):
    """An A1111 `.safetensors` embedding ({"emb_params": [n, width]}); its token is the file stem."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"emb_params": rng.normal(0, 0.02, (vectors, width)).astype("float32")}, path)
    return path
