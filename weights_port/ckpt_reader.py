"""Read PyTorch zip-format checkpoints (.ckpt/.pt/.pth/.bin) without torch.

Nothing from the pickle is ever imported or executed: ``data.pkl`` is loaded
by a restricted unpickler whose ``find_class`` only hands out our own inert
stand-ins listed in :data:`ALLOWED_GLOBALS`; every other global is refused
with :class:`CheckpointError` before anything could run.

Layout read (as written by ``torch.save`` since PyTorch 1.6)::

    <folder>/data.pkl      pickle (protocol 2); storages are persistent ids
                           ('storage', <torch.XStorage>, key, location, numel)
    <folder>/data/<key>    raw little-endian bytes of storage <key>
    <folder>/byteorder     "little" (absent in old files: little assumed)
    <folder>/version, .format_version, .storage_alignment, .data/... (ignored)

Tensors come back as contiguous numpy arrays in native byte order (copies;
nothing refers to the file afterwards).  bfloat16 becomes float32.
Uncompressed (stored) storages are read through one read-only memory map of
the file, compressed ones with ``ZipFile.read``; each storage once.
CRCs of memory-mapped entries are not verified.
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile

import numpy as np

from .errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "read_ckpt", "load_ckpt"]

_MAX_BROADCAST_ELEMENTS = 1 << 28  # stride-0 tensors may address more than their storage, up to this


class _Refused(Exception):
    """Internal: raised inside the unpickler; turned into CheckpointError naming the file."""


# ----------------------------------------------------------------------------- stand-ins
class _Global:
    """A callable stand-in for an allowed global (never the real object)."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname, fn):
        self.qualname, self.fn = qualname, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise _Refused(f"BUILD on global {self.qualname!r} is not allowed")

    def __repr__(self):
        return f"<stand-in {self.qualname}>"


class _StorageType:
    """Marker for torch.<X>Storage: knows the on-disk element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __call__(self, *args):
        raise _Refused(f"constructing {self.name} directly is not allowed")

    def __setstate__(self, state):
        raise _Refused(f"BUILD on {self.name} is not allowed")

    def __repr__(self):
        return self.name


class _Inert:
    """Placeholder for harmless metadata classes (e.g. Lightning's ModelCheckpoint)."""

    __slots__ = ("qualname",)

    def __init__(self, qualname):
        self.qualname = qualname

    def __call__(self, *args):
        return _Inert(self.qualname + "()")

    def __setstate__(self, state):  # discard whatever state the real object had
        pass

    def __eq__(self, other):
        return isinstance(other, _Inert) and other.qualname == self.qualname

    def __hash__(self):
        return hash(("_Inert", self.qualname))

    def __repr__(self):
        return f"<inert {self.qualname}>"


class _SafeOrderedDict(collections.OrderedDict):
    """collections.OrderedDict stand-in; BUILD state (nn.Module's ``_metadata``) is dropped."""

    def __setstate__(self, state):
        pass


class _Sealed:
    """Our own records: pickle's BUILD must not overwrite validated fields."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"BUILD on a {type(self).__name__[1:]} is not allowed")


class _StorageRef(_Sealed):
    __slots__ = ("type", "key", "numel", "info")

    def __init__(self, type_, key, numel, info):
        self.type, self.key, self.numel, self.info = type_, key, numel, info


class _TensorRef(_Sealed):
    """A tensor as described by data.pkl; materialised later, when its name is known."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, requires_grad, hooks, [metadata])."""
    if not isinstance(storage, _StorageRef):
        raise _Refused(f"tensor rebuild expects a storage, got {type(storage).__name__}")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise _Refused(f"tensor on storage {storage.key!r}: storage_offset {storage_offset!r} "
                       "must be a non-negative int")
    for what, seq in (("size", size), ("stride", stride)):
        if not isinstance(seq, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in seq):
            raise _Refused(f"tensor on storage {storage.key!r}: {what} {seq!r} "
                           "must be a tuple of non-negative ints")
    if len(size) != len(stride):
        raise _Refused(f"tensor on storage {storage.key!r}: size {tuple(size)} and stride "
                       f"{tuple(stride)} have different lengths")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise _Refused(f"parameter rebuild expects a tensor, got {type(data).__name__}")
    return data


_NP_SCALAR_DTYPES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8".split())


class _DType:
    """numpy.dtype stand-in: only plain numeric dtypes; BUILD may only set the byte order."""

    __slots__ = ("dtype",)

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str) or name not in _NP_SCALAR_DTYPES:
            raise _Refused(f"numpy.dtype({name!r}) is not allowed: only {sorted(_NP_SCALAR_DTYPES)}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _Refused(f"unexpected numpy.dtype state {state!r}")
        self.dtype = self.dtype.newbyteorder(state[1])


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Refused(f"numpy scalar needs an allowed dtype and exactly its itemsize of bytes, "
                       f"got {dtype!r}, {data!r}")
    return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode only allowed as (str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


def _make_set(kind):
    def make(items=()):
        if not isinstance(items, (list, tuple)):
            raise _Refused(f"{kind.__name__}() expects a list, got {type(items).__name__}")
        return kind(items)
    return make


_STORAGES = {
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "u1",
}


def _build_allowed():
    allowed = {"collections.OrderedDict": _Global("collections.OrderedDict", _SafeOrderedDict)}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        allowed[f"torch._utils.{name}"] = _Global(f"torch._utils.{name}", _rebuild_tensor)
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[f"torch._utils.{name}"] = _Global(f"torch._utils.{name}", _rebuild_parameter)
    for name, dtype in _STORAGES.items():
        allowed[f"torch.{name}"] = _StorageType(f"torch.{name}", dtype)
    mc = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    allowed[mc] = _Inert(mc)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}.scalar"] = _Global(f"{mod}.scalar", _np_scalar)
    allowed["numpy.dtype"] = _Global("numpy.dtype", _DType)
    allowed["_codecs.encode"] = _Global("_codecs.encode", _codecs_encode)
    for mod in ("builtins", "__builtin__"):  # protocol-2 pickles spell it __builtin__
        allowed[f"{mod}.set"] = _Global(f"{mod}.set", _make_set(set))
        allowed[f"{mod}.frozenset"] = _Global(f"{mod}.frozenset", _make_set(frozenset))
    return allowed


#: "module.name" -> our stand-in.  The only globals data.pkl may reference.
ALLOWED_GLOBALS = _build_allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, ckpt):
        super().__init__(file)
        self._ckpt = ckpt

    def find_class(self, module, name):
        qualname = f"{module}.{name}"
        try:
            return ALLOWED_GLOBALS[qualname]
        except KeyError:
            raise _Refused(
                f"refusing global {qualname!r} in data.pkl: only tensor-rebuilding and inert globals "
                "are allowed (torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict, "
                "...; full list in weights_port.ckpt_reader.ALLOWED_GLOBALS). Nothing was executed; "
                "do not load this file with torch.load unless you trust it") from None

    def persistent_load(self, pid):
        return self._ckpt.storage_ref(pid)


# ----------------------------------------------------------------------------- the zip file
class _CkptFile:
    def __init__(self, path):
        self.path = os.fspath(path)
        self._storages = {}  # key -> _StorageRef
        self._arrays = {}    # key -> 1-D np array (read once)
        self._map = None
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            self._fail(f"cannot read checkpoint: {e.strerror or e}")
        if magic != b"PK\x03\x04":
            kind = ("a legacy (non-zip) PyTorch pickle" if magic[:1] == b"\x80"
                    else f"not a zip file (starts with {magic!r})")
            self._fail(f"not a zip-format PyTorch checkpoint: {kind}. Re-save it with torch.save "
                       "(PyTorch >= 1.6) or convert it to .safetensors")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            self._fail(f"not a zip-format PyTorch checkpoint (bad zip: {e}). Re-save it with "
                       "torch.save or convert it to .safetensors")
        try:
            self._check_entries()
        except BaseException:
            self.zip.close()
            raise

    def _fail(self, msg):
        raise CheckpointError(f"{self.path}: {msg}") from None

    def close(self):
        self.zip.close()
        self._arrays.clear()
        self._map = None

    def _check_entries(self):
        infos = self.zip.infolist()
        names = [i.filename for i in infos]
        for n in names:
            parts = n.split("/")
            if "\\" in n or n.startswith("/") or ".." in parts or (len(n) > 1 and n[1] == ":"):
                self._fail(f"unsafe zip entry name {n!r} (absolute, '..' or backslash)")
        dupes = sorted(n for n, c in collections.Counter(names).items() if c > 1)
        if dupes:
            self._fail(f"duplicate zip entries {dupes}")
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            self._fail(f"expected exactly one '<folder>/data.pkl' entry, found {len(pkls)}: {pkls}")
        self.folder = pkls[0][: -len("/data.pkl")]
        stray = [n for n in names if n.split("/")[0] != self.folder or "/" not in n]
        if stray:
            self._fail(f"zip entries outside the checkpoint folder {self.folder!r}: {stray[:5]}")
        self.infos = {i.filename: i for i in infos}
        bo = self.infos.get(f"{self.folder}/byteorder")
        if bo is not None:
            order = self.zip.read(bo).decode("ascii", "replace").strip()
            if order != "little":
                self._fail(f"entry {bo.filename!r} says byteorder {order!r}; only 'little' is supported "
                           "(re-save the checkpoint on a little-endian machine)")

    # -- unpickling
    def load_tree(self):
        try:
            with self.zip.open(f"{self.folder}/data.pkl") as pkl:
                return _RestrictedUnpickler(pkl, self).load()
        except _Refused as e:
            self._fail(str(e))
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
                AttributeError, OverflowError, RuntimeError, NotImplementedError, OSError,
                zipfile.BadZipFile, struct.error) as e:
            self._fail(f"malformed {self.folder}/data.pkl: {type(e).__name__}: {e}")

    def storage_ref(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {pid!r}: expected "
                           "('storage', storage_type, key, location, numel)")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise _Refused(f"persistent id {pid!r}: {stype!r} is not a supported storage type "
                           f"(allowed: {', '.join('torch.' + s for s in _STORAGES)})")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) or numel < 0:
            raise _Refused(f"malformed persistent id {pid!r}")
        ref = self._storages.get(key)
        if ref is not None:
            if ref.type is not stype or ref.numel != numel:
                raise _Refused(f"storage {key!r} is used as both {ref.type}[{ref.numel}] "
                               f"and {stype}[{numel}]")
            return ref
        entry = f"{self.folder}/data/{key}"
        info = self.infos.get(entry)
        if info is None:
            raise _Refused(f"storage {key!r}: zip entry {entry!r} is missing")
        need = numel * stype.dtype.itemsize
        if info.file_size < need:
            raise _Refused(f"storage {key!r}: entry {entry!r} has {info.file_size} bytes but "
                           f"{numel} x {stype} needs {need}")
        ref = self._storages[key] = _StorageRef(stype, key, numel, info)
        return ref

    # -- materialising
    def _storage_array(self, ref):
        arr = self._arrays.get(ref.key)
        if arr is not None:
            return arr
        dtype, info = ref.type.dtype, ref.info
        if ref.numel == 0:
            arr = np.empty(0, dtype)
        elif info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
            if self._map is None:
                self._map = np.asarray(np.memmap(self.path, dtype=np.uint8, mode="r"))
            start = self._data_offset(info)
            arr = self._map[start:start + ref.numel * dtype.itemsize].view(dtype)
        else:
            try:
                data = self.zip.read(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError) as e:
                self._fail(f"cannot read storage entry {info.filename!r}: {e}")
            arr = np.frombuffer(data, dtype, count=ref.numel)
        self._arrays[ref.key] = arr
        return arr

    def _data_offset(self, info):
        """Where an uncompressed entry's bytes start (after its local header)."""
        m = self._map
        h = info.header_offset
        if h + 30 > len(m) or bytes(m[h:h + 4]) != b"PK\x03\x04":
            self._fail(f"bad local header for zip entry {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", bytes(m[h + 26:h + 30]))
        raw = bytes(m[h + 30:h + 30 + name_len])
        name = raw.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
        start = h + 30 + name_len + extra_len
        if name != info.orig_filename or start + info.file_size > len(m) or info.compress_size != info.file_size:
            self._fail(f"zip entry {info.filename!r}: local header does not match the directory")
        return start

    def tensor(self, ref, name):
        st = ref.storage
        numel = math.prod(ref.size)
        if numel == 0:
            return _finish(np.empty(ref.size, st.type.dtype), st.type)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= st.numel:
            self._fail(f"tensor {name!r} (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
                       f"addresses element {last} but storage {st.key!r} has only {st.numel} elements")
        if numel > max(st.numel, _MAX_BROADCAST_ELEMENTS):
            self._fail(f"tensor {name!r} has {numel} elements, far more than its storage "
                       f"{st.key!r} ({st.numel})")
        base = self._storage_array(st)[ref.offset:]
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base, shape=ref.size, strides=[s * item for s in ref.stride], writeable=False)
        return _finish(view.copy(), st.type)


def _finish(arr, stype):
    """Storage dtype -> returned dtype: bfloat16 -> float32, bool bytes -> bool, native byte order."""
    if stype.name == "torch.BFloat16Storage":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if stype.name == "torch.BoolStorage":
        return arr != 0
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _materialize(tree, ckpt, name="", memo=None):
    """Replace tensor records by arrays; shared/cyclic containers are visited once."""
    memo = {} if memo is None else memo
    if id(tree) in memo:
        return memo[id(tree)]
    if isinstance(tree, _TensorRef):
        out = ckpt.tensor(tree, name)
    elif isinstance(tree, dict):
        out = memo[id(tree)] = {}
        for k, v in tree.items():
            out[k] = _materialize(v, ckpt, f"{name}.{k}" if name else str(k), memo)
    elif isinstance(tree, list):
        out = memo[id(tree)] = []
        out.extend(_materialize(v, ckpt, f"{name}[{i}]", memo) for i, v in enumerate(tree))
    elif isinstance(tree, tuple):
        out = tuple(_materialize(v, ckpt, f"{name}[{i}]", memo) for i, v in enumerate(tree))
    else:
        return tree
    memo[id(tree)] = out
    return out


def load_ckpt(path):
    """The whole unpickled object, tensors as numpy arrays, OrderedDicts as dicts.

    Unsupported objects never appear: loading fails on them.  Lightning's
    ModelCheckpoint shows up as an inert placeholder.
    """
    ckpt = _CkptFile(path)
    try:
        return _materialize(ckpt.load_tree(), ckpt)
    finally:
        ckpt.close()


def read_ckpt(path) -> dict[str, np.ndarray]:
    """Tensors of a zip-format torch checkpoint, flat ``{name: np.ndarray}``.

    If the top-level dict has "state_dict" (Lightning), its tensors are
    returned; otherwise the top-level dict's tensors.  Non-tensor entries are
    ignored.  Raises CheckpointError for anything unsafe or malformed.
    """
    ckpt = _CkptFile(path)
    try:
        top = ckpt.load_tree()
        if not isinstance(top, dict):
            ckpt._fail(f"top-level object of data.pkl is {type(top).__name__}, expected a dict "
                       "(a state dict, or a dict with 'state_dict')")
        sd = top.get("state_dict", top)
        if not isinstance(sd, dict):
            ckpt._fail(f"'state_dict' is {type(sd).__name__}, expected a dict of tensors")
        out = {}
        for k, v in sd.items():
            if isinstance(v, _TensorRef):
                if not isinstance(k, str):
                    ckpt._fail(f"tensor key {k!r} is not a string")
                out[k] = ckpt.tensor(v, k)
        if not out:
            ckpt._fail("no tensors found (expected a state dict, or a dict with 'state_dict')")
        return out
    finally:
        ckpt.close()
