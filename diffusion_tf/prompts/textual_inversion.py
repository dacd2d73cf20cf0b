"""Textual-inversion embedding files -> (token, vectors per text encoder).

Formats (loading never runs code from a file: `.pt`/`.bin` go through weights_port's restricted
unpickler, which refuses every global but tensor rebuilding and names the one it refused):
- A1111 `.pt`: {"string_to_param": {"*": [n, D]}, "name": ..., ...}; the token is its `name`;
- A1111 `.safetensors`: {"emb_params": [n, D]}; the token is the file stem;
- diffusers `learned_embeds.safetensors` / `.bin`: {token: [D] or [n, D]}; the token is the key;
- SDXL `.safetensors`: {"clip_l": [n, 768], "clip_g": [n, 1280]}, one set of vectors per encoder
  (the base needs both; the refiner, which has only the bigG encoder, reads clip_g, so a
  clip_g-only file is for the refiner); the token is the file stem.
A token given by the caller replaces the file's. Several vectors become the tokens `tok`, `tok_1`,
... (diffusers' rule); `tok` alone in a prompt stands for all of them.
"""

import os

import numpy as np

from weights_port.ckpt_reader import load_ckpt
from weights_port.errors import CheckpointError
from weights_port.safetensors_reader import read_safetensors

EXTENSIONS = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """A file that is not a textual-inversion embedding this model can use."""


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _matrix(value, what):
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        raise EmbeddingError(f"{what}: expected float vectors, got {value.dtype} {list(value.shape)}.")
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] < 1:
        raise EmbeddingError(f"{what}: expected vectors [n, width], got shape {list(value.shape)}.")
    if not np.all(np.isfinite(value)):
        raise EmbeddingError(f"{what}: contains NaN or Inf values.")
    return value.astype("float32")


def read_embedding(path):
    """(the file's own token or None, {encoder key: float32 [n, D]}) where the key is "text_encoder"
    (one encoder, SD 1.x/2.x) or "clip_l"/"clip_g" (SDXL files)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EmbeddingError(f"embedding file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise EmbeddingError(f"embedding file {path!r}: unsupported extension {ext!r}; allowed: {', '.join(EXTENSIONS)}.")
    try:
        data = read_safetensors(path) if ext == ".safetensors" else load_ckpt(path)
    except CheckpointError as e:
        raise EmbeddingError(f"embedding file {path!r} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"embedding file {path!r}: top-level object is {type(data).__name__}, expected a dict.")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"embedding file {path!r}: string_to_param must hold one tensor.")
        name = data.get("name")
        return (name if isinstance(name, str) and name else None), {
            "text_encoder": _matrix(next(iter(params.values())), f"{path!r}: string_to_param")}
    tensors = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if tensors and set(tensors) <= set(SDXL_KEYS) and (len(tensors) == len(SDXL_KEYS) or len(data) == 1):
        # SDXL: both encoders' vectors, or one encoder's (a clip_g-only file is the refiner's)
        return None, {k: _matrix(tensors[k], f"{path!r}: {k}") for k in SDXL_KEYS if k in tensors}
    if "emb_params" in tensors and len(tensors) == 1:  # A1111 .safetensors
        return None, {"text_encoder": _matrix(tensors["emb_params"], f"{path!r}: emb_params")}
    if len(tensors) == 1 and len(data) == 1:  # diffusers {token: vector}
        token, value = next(iter(tensors.items()))
        return str(token), {"text_encoder": _matrix(value, f"{path!r}: {token}")}
    raise EmbeddingError(
        f"embedding file {path!r} is not a textual-inversion embedding: expected A1111's string_to_param or "
        f"emb_params, diffusers' {{token: vector}} or SDXL's clip_l/clip_g; found keys "
        f"{sorted(map(str, data))[:10]}{' (a LoRA or a model checkpoint?)' if len(data) > 4 else ''}."
    )


def default_token(path, file_token):
    """The token an embedding gets when none is given: the file's own, else the file stem."""
    return file_token or _stem(path)


def expanded_tokens(token, n):
    """diffusers' names for n vectors: tok, tok_1, ..., tok_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def find_in_folder(folder, text):
    """{stem: path} of the embedding files in `folder` whose stem occurs in `text` as a word (case
    insensitive), as A1111's embeddings folder works."""
    import re

    if not folder or not os.path.isdir(folder):
        return {}
    lowered = text.lower()
    out = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in EXTENSIONS and stem and re.search(
                r"(?<![\w])" + re.escape(stem.lower()) + r"(?![\w])", lowered):
            out.setdefault(stem, os.path.join(folder, name))
    return out
