"""Write PyTorch zip-format checkpoints from numpy, without torch (test support).

The pickle is emitted opcode by opcode (protocol 2, no memo), so it can
reference ``torch._utils._rebuild_tensor_v2`` and ``torch.FloatStorage`` --
or, for the hostile-file helpers, ``posix.system`` -- without importing them.

Object graph vocabulary for :func:`pickle_bytes`: None, bool, int, float, str,
bytes, tuple, list, dict, plus :class:`Global`, :class:`Reduce`,
:class:`Persistent`, :class:`Raw` and :class:`TorchTensor`/np.ndarray (tensors,
only inside :func:`torch_zip_entries`).
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
    np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


# ----------------------------------------------------------------------------- pickle emitter
@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass
class Reduce:
    func: Any
    args: tuple = ()
    state: Any = None  # emitted with BUILD when not None
    items: dict | None = None  # emitted with SETITEMS after REDUCE (as pickle does for dicts)


@dataclass
class Persistent:
    pid: tuple


@dataclass
class Raw:
    """Opcodes pasted verbatim (e.g. pickle.dumps(x, 2)[2:-1] -- PROTO and STOP stripped)."""
    opcodes: bytes


def _emit(obj, out: bytearray):
    if obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])
        elif -(2 ** 31) <= obj < 2 ** 31:
            out += b"J" + struct.pack("<i", obj)
        else:
            b = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            out += b"\x8a" + bytes([len(b)]) + b
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        out += b"X" + struct.pack("<I", len(b)) + b
    elif isinstance(obj, bytes):  # protocol 2 has no bytes opcode: same trick as CPython
        _emit(Reduce(Global("_codecs", "encode"), (obj.decode("latin1"), "latin1")), out)
    elif isinstance(obj, tuple):
        out += b"("
        for x in obj:
            _emit(x, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for x in obj:
            _emit(x, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        out += b"u"
    elif isinstance(obj, Global):
        out += b"c" + f"{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, Reduce):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        out += b"R"
        if obj.items:
            out += b"("
            for k, v in obj.items.items():
                _emit(k, out)
                _emit(v, out)
            out += b"u"
        if obj.state is not None:
            _emit(obj.state, out)
            out += b"b"
    elif isinstance(obj, Persistent):
        _emit(obj.pid, out)
        out += b"Q"
    elif isinstance(obj, Raw):
        out += obj.opcodes
    else:
        raise TypeError(f"cannot emit {type(obj).__name__}")


def pickle_bytes(obj) -> bytes:
    """Protocol-2 pickle of ``obj`` (see module docstring for what may appear)."""
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


# ----------------------------------------------------------------------------- tensors
@dataclass(eq=False)
class TorchTensor:
    """A tensor as torch stores it: a view (offset/shape/stride in elements) of a 1-D storage.

    Tensors whose ``storage`` is the *same numpy object* share one storage
    entry.  ``bfloat16=True``: ``storage`` holds uint16 bfloat16 bit patterns.
    """
    storage: np.ndarray
    offset: int = 0
    shape: tuple = ()
    stride: tuple | None = None  # None: contiguous
    bfloat16: bool = False
    parameter: bool = False  # wrap in torch._utils._rebuild_parameter
    storage_numel: int | None = None  # override the numel written in the persistent id

    def numpy(self) -> np.ndarray:
        """What the tensor holds (bfloat16 widened to float32), for comparisons."""
        base = self.storage
        if self.bfloat16:
            base = (base.astype(np.uint32) << 16).view(np.float32)
        stride = self.stride or _contiguous_stride(self.shape)
        return np.lib.stride_tricks.as_strided(
            base[self.offset:], self.shape, [s * base.itemsize for s in stride]).copy()


def _contiguous_stride(shape):
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def module_state_dict(tensors) -> Reduce:
    """An OrderedDict carrying ``_metadata`` (BUILD state), as nn.Module.state_dict() pickles."""
    metadata = Reduce(Global("collections", "OrderedDict"), items={"": {"version": 1}})
    return Reduce(Global("collections", "OrderedDict"), items=dict(tensors),
                  state={"_metadata": metadata})


def to_bfloat16_bits(x) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits (round to nearest even)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bfloat16_tensor(x) -> TorchTensor:
    x = np.asarray(x, np.float32)
    return TorchTensor(to_bfloat16_bits(x).reshape(-1), 0, x.shape, bfloat16=True)


@dataclass
class _Storages:
    entries: dict = field(default_factory=dict)  # id(storage array) -> (key, storage array)

    def key(self, arr):
        if id(arr) not in self.entries:
            self.entries[id(arr)] = (str(len(self.entries)), arr)
        return self.entries[id(arr)][0]


def _tensor_node(t, storages: _Storages):
    if isinstance(t, np.ndarray):
        flat = np.ascontiguousarray(t).reshape(-1)
        t = TorchTensor(flat, 0, t.shape)
    dtype = "BFloat16Storage" if t.bfloat16 else _STORAGE_NAMES[t.storage.dtype]
    numel = t.storage.size if t.storage_numel is None else t.storage_numel
    pid = ("storage", Global("torch", dtype), storages.key(t.storage), "cpu", numel)
    stride = tuple(t.stride) if t.stride is not None else _contiguous_stride(t.shape)
    node = Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                  (Persistent(pid), t.offset, tuple(t.shape), stride, False,
                   Reduce(Global("collections", "OrderedDict"))))
    if t.parameter:
        node = Reduce(Global("torch._utils", "_rebuild_parameter"),
                      (node, True, Reduce(Global("collections", "OrderedDict"))))
    return node


def _replace_tensors(obj, storages):
    if isinstance(obj, (np.ndarray, TorchTensor)):
        return _tensor_node(obj, storages)
    if isinstance(obj, dict):
        return {k: _replace_tensors(v, storages) for k, v in obj.items()}
    if isinstance(obj, Reduce) and obj.items:
        return Reduce(obj.func, obj.args, obj.state, _replace_tensors(obj.items, storages))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(v, storages) for v in obj)
    return obj


def torch_zip_entries(tensors, wrap_in_state_dict=True, archive_name="archive", extra=None,
                      byteorder="little") -> dict[str, bytes]:
    """The zip entries ``torch.save`` would write (name -> bytes, data.pkl first)."""
    storages = _Storages()
    sd = _replace_tensors(tensors if isinstance(tensors, Reduce) else dict(tensors), storages)
    extra = _replace_tensors(dict(extra or {}), storages)  # extra entries come first in data.pkl
    if wrap_in_state_dict:
        top = {**extra, "state_dict": sd}
    else:
        top = {**extra, **sd} if extra else sd
    entries = {f"{archive_name}/data.pkl": pickle_bytes(top)}
    for key, arr in storages.entries.values():
        entries[f"{archive_name}/data/{key}"] = np.ascontiguousarray(arr).astype(
            arr.dtype.newbyteorder("<"), copy=False).tobytes()
    entries[f"{archive_name}/version"] = b"3\n"
    if byteorder is not None:
        entries[f"{archive_name}/byteorder"] = byteorder.encode()
    return entries


def write_zip(path, entries, compress=False):
    """Write entries (name -> bytes, or a list of pairs to allow duplicate names)."""
    items = entries.items() if isinstance(entries, dict) else entries
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as z:
        for name, data in items:
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = mode
            z.writestr(info, data)
    return path


def save_torch_zip(tensors, path, wrap_in_state_dict=True, archive_name="archive", extra=None):
    """Write ``tensors`` ({name: np.ndarray | TorchTensor}) as a file torch.load(weights_only=True) reads."""
    return write_zip(path, torch_zip_entries(tensors, wrap_in_state_dict, archive_name, extra))


# ----------------------------------------------------------------------------- hostile files
LIGHTNING_MODEL_CHECKPOINT = Global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")

COMMAND_PAYLOADS = ("posix.system", "builtins.exec", "subprocess.call", "os.system")


def command_payload(kind, marker):
    """An object graph that, if unpickled by plain pickle, creates the file ``marker``."""
    marker = os.fspath(marker)
    if kind in ("posix.system", "os.system"):
        return Reduce(Global(*kind.split(".")), (f"touch '{marker}'",))
    if kind == "builtins.exec":
        return Reduce(Global("builtins", "exec"), (f"open({marker!r}, 'w').close()",))
    if kind == "subprocess.call":
        return Reduce(Global("subprocess", "call"), (["touch", marker],))
    raise ValueError(kind)


def hostile_command_file(path, kind, marker):
    """A zip checkpoint whose data.pkl runs a command (``kind``) before its one tensor."""
    entries = torch_zip_entries({"w": np.ones(2, np.float32)}, wrap_in_state_dict=False,
                                extra={"evil": command_payload(kind, marker)})
    return write_zip(path, entries)


def hostile_short_storage(path):
    """Storage entry has fewer bytes than its persistent id's numel needs."""
    entries = torch_zip_entries({"w": np.arange(6, dtype=np.float32)})
    entries["archive/data/0"] = entries["archive/data/0"][:8]
    return write_zip(path, entries)


def hostile_offset_beyond(path):
    """A tensor whose storage_offset+extent lies outside its (correctly sized) storage."""
    t = TorchTensor(np.arange(4, dtype=np.float32), offset=3, shape=(2,), stride=(1,))
    return write_zip(path, torch_zip_entries({"w": t}))


def hostile_two_data_pkl(path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    entries.update({f"other/{k.split('/', 1)[1]}": v for k, v in entries.items()})
    return write_zip(path, entries)


def hostile_dotdot_entry(path, name="archive/../evil.txt"):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    entries[name] = b"pwned"
    return write_zip(path, entries)


def hostile_big_endian(path):
    entries = torch_zip_entries({"w": np.ones(2, np.float32)}, byteorder="big")
    return write_zip(path, entries)


def legacy_pickle_file(path):
    """What torch.save(..., _use_new_zipfile_serialization=False) starts with: pickled magic number."""
    magic = 0x1950A86A20F9469CFC6C
    with open(path, "wb") as f:
        f.write(pickle.dumps(magic, protocol=2) + pickle.dumps(1001, protocol=2))
    return path
