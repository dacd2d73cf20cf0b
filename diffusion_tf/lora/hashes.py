"""A1111's LoRA hashes.

stable-diffusion-webui names a LoRA in its infotext by a short hash: the first 12 hex digits of
a sha256. For a `.safetensors` file it is the "addnet hash" (kohya-ss / sd-webui-additional-networks):
the sha256 of the file's content after the header (the 8-byte length and the JSON header are
skipped, so editing the metadata does not change it); for any other file, the sha256 of the whole file.
"""

import hashlib
import os
import struct

from diffusion_tf.lora.errors import LoraError

SHORT = 12
_BLOCK = 1 << 20


def _sha256(f, start=0):
    h = hashlib.sha256()
    f.seek(start)
    for chunk in iter(lambda: f.read(_BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def safetensors_data_offset(f, size, path):
    """Where a safetensors file's tensor bytes start (8 + header length)."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise LoraError(f"{path}: {size} bytes, too short for a safetensors file.")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise LoraError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes).")
    return 8 + n


def full_file_hash(path):
    """sha256 (64 hex digits) of the bytes A1111 hashes (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file {path!r} does not exist" + (" (it is not a file)." if os.path.exists(path) else "."))
    with open(path, "rb") as f:
        start = 0
        if path.lower().endswith(".safetensors"):
            start = safetensors_data_offset(f, os.fstat(f.fileno()).st_size, path)
        return _sha256(f, start)


def file_hash(path):
    """A1111's short LoRA hash: the first 12 hex digits of `full_file_hash(path)`."""
    return full_file_hash(path)[:SHORT]
