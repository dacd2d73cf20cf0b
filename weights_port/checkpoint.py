"""Read any supported checkpoint file into ``{name: np.ndarray}``."""
from __future__ import annotations

import os

import numpy as np

from .ckpt_reader import read_ckpt
from .errors import CheckpointError
from .safetensors_reader import read_safetensors, read_safetensors_mapped

__all__ = ["read_checkpoint", "READERS"]

#: lower-case extension -> reader
READERS = {
    ".safetensors": read_safetensors,
    ".ckpt": read_ckpt,
    ".pt": read_ckpt,
    ".pth": read_ckpt,
    ".bin": read_ckpt,
}


def read_checkpoint(path, mapped=False) -> dict[str, np.ndarray]:
    """Dispatch on the file extension; raises CheckpointError for missing/unsupported files.
    `mapped`: .safetensors tensors as read-only views of a memory map (the converter's way)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    reader = READERS.get(ext)
    if reader is None:
        raise CheckpointError(f"{path}: unsupported checkpoint extension {ext or '(none)'!r}; "
                              f"expected one of {', '.join(READERS)}")
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"{path}: checkpoint file {what}")
    if mapped and reader is read_safetensors:
        return read_safetensors_mapped(path)
    return reader(path)
