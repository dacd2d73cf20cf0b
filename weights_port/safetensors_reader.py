"""A strict, self-contained .safetensors reader (no `safetensors` package needed).

File layout: 8-byte little-endian header length N, N bytes of JSON header,
then the byte buffer.  The header maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
buffer) plus an optional ``"__metadata__"`` dict of str -> str.

Everything is validated before any tensor data is touched: header size
(<= 100 MB and inside the file, checked before it is read), JSON syntax,
duplicate names, dtypes, shapes, byte sizes, and that the tensors tile the
buffer exactly (sorted offsets start at 0, no gaps, no overlaps, end at the
end of the file).

Returned arrays are in-memory copies in native byte order (read through a
read-only memory map, so memory peaks at about one copy of the weights);
they stay valid after the file is closed or deleted.  BF16 becomes float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

from .ckpt_reader import _short
from .errors import CheckpointError

__all__ = ["read_safetensors", "read_safetensors_metadata", "read_safetensors_with_digest", "MAX_HEADER_BYTES", "DTYPES"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_NDIM = 32  # numpy 1.x limit; real checkpoints have <= 5

#: safetensors dtype -> on-disk numpy dtype (BF16 is widened to float32 on read)
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1",
}


def _no_duplicates(path):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise CheckpointError(f"{path}: duplicate name {_short(k)} in the safetensors header")
            seen[k] = v
        return seen
    return hook


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _parse(path):
    """-> (header {name: info}, user metadata, buffer start, buffer length)."""
    path = os.fspath(path)

    def fail(msg):
        raise CheckpointError(f"{path}: {msg}")

    try:
        f = open(path, "rb")
    except OSError as e:
        fail(f"cannot read safetensors file: {e.strerror or e}")
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            fail(f"file is {size} bytes, too short for a safetensors header length (8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
        if 8 + n > size:
            fail(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except CheckpointError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"header is not valid UTF-8 JSON: {e}")
    if not isinstance(header, dict):
        fail(f"header must be a JSON object, got {type(header).__name__}")

    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        fail(f"'__metadata__' must be an object of str -> str, got {_short(meta)}")

    buf_len = size - 8 - n
    infos = {}
    for name, e in header.items():
        name_ = _short(name)
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            fail(f"tensor {name_}: entry must be an object with exactly dtype, shape, data_offsets; "
                 f"got {_short(e)}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            fail(f"tensor {name_}: unsupported dtype {_short(dtype)} (supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            fail(f"tensor {name_}: shape {_short(shape)} must be a list of non-negative ints")
        if len(shape) > _MAX_NDIM:
            fail(f"tensor {name_}: shape has {len(shape)} dimensions; at most {_MAX_NDIM} are supported")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if math.prod(d for d in shape if d) * itemsize >= 1 << 63:
            fail(f"tensor {name_}: shape {_short(shape)} is too large")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            fail(f"tensor {name_}: data_offsets {_short(offs)} must be [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * itemsize
        if offs[1] - offs[0] != need:
            fail(f"tensor {name_}: data_offsets {_short(offs)} span {_short(offs[1] - offs[0])} bytes but "
                 f"{dtype} {_short(shape)} needs {need}")
        infos[name] = {"dtype": dtype, "shape": tuple(shape), "data_offsets": tuple(offs)}

    pos, prev = 0, None
    for name, info in sorted(infos.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        if begin != pos:
            what = "overlaps" if begin < pos else "leaves a gap after"
            fail(f"tensor {_short(name)} (bytes {begin}..{end}) {what} "
                 f"{'the start of the buffer' if prev is None else _short(prev)} (which ends at {pos}); "
                 "tensors must tile the buffer contiguously")
        pos, prev = end, name
    if pos != buf_len:
        fail(f"tensor data ends at byte {pos} of the buffer but the buffer is {buf_len} bytes "
             f"({'trailing garbage' if pos < buf_len else 'file truncated'})")
    return infos, meta, 8 + n, buf_len


def read_safetensors_metadata(path) -> dict[str, dict]:
    """Validated header only: ``{name: {"dtype": str, "shape": tuple, "data_offsets": (b, e)}}``.

    No tensor data is read (use it to infer an architecture from shapes).
    The optional ``__metadata__`` entry is not included.
    """
    return _parse(path)[0]


def _decode(infos, data, copy=True):
    """{name: array} of the parsed header's tensors from the buffer `data` (a memory map or None);
    copy=False: native-order tensors stay views of the map (file pages, not process memory)."""
    out = {}
    for name, info in infos.items():
        begin, end = info["data_offsets"]
        disk = np.dtype(DTYPES[info["dtype"]])
        if begin == end:
            arr = np.empty(info["shape"], disk)
        else:
            arr = np.asarray(data[begin:end]).view(disk).reshape(info["shape"])
            if copy:
                arr = arr.copy()
        if info["dtype"] == "BF16":  # (in place: a ufunc would turn a 0-d array into a scalar)
            arr = arr.astype(np.uint32)
            arr <<= 16
            arr = arr.view(np.float32)
        elif info["dtype"] == "BOOL":
            arr = arr.astype(bool)
        else:
            arr = arr.astype(disk.newbyteorder("="), copy=False)
        out[name] = arr
    return out


def _read(path, digest):
    infos, meta, start, buf_len = _parse(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(buf_len,)) if buf_len else None
    try:
        sha = hashlib.sha256(memoryview(data) if data is not None else b"").hexdigest() if digest else None
        return _decode(infos, data), dict(meta or {}), sha
    finally:
        del data


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as ``{name: np.ndarray}`` (copies, native byte order)."""
    return _read(path, digest=False)[0]


def read_safetensors_mapped(path) -> dict[str, np.ndarray]:
    """The tensors as read-only views of a memory map of the file (BF16, BOOL and foreign-order
    tensors are converted copies): a converter reads a 14 GB SDXL file without holding it."""
    infos, _, start, buf_len = _parse(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(buf_len,)) if buf_len else None
    return _decode(infos, data, copy=False)


def read_safetensors_with_digest(path):
    """(tensors, the header's ``__metadata__`` {str: str}, sha256 hex of the byte buffer after the
    header), reading the file once (the digest is A1111's "addnet" hash of a LoRA)."""
    return _read(path, digest=True)
