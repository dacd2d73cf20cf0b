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
the file, deflated ones with ``ZipFile.open``; each storage once.  Other
compression methods are refused.  CRCs of memory-mapped entries are not
verified (data.pkl, byteorder and deflated entries are read whole, CRC checked).

Hostile files are refused before they cost much: data.pkl is at most
MAX_PICKLE_BYTES and is unpickled by the pure-Python unpickler, so every
opcode goes through code that bounds the work (no pre-allocation from a
declared length; dict keys and set items may cost at most a budget of hashing
work, so a few hundred bytes of memo references cannot make a key that takes
forever to hash; memo indices < 2**32); sizes, strides and offsets are int64
and at most 32 dimensions; a tensor must lie inside its storage (stride-0
broadcasts may add up to 2**24 elements each); all tensors together may not
exceed 4x the storage bytes plus 128 MiB; deflated entries may not claim more
than deflate can produce; error messages quote values through a bounded repr.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import threading
import zipfile
import zlib

import numpy as np

from .errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "MAX_PICKLE_BYTES", "read_ckpt", "load_ckpt"]

MAX_PICKLE_BYTES = 100 * 1024 * 1024  # data.pkl (uncompressed); real ones are a few MB at most
_MAX_BROADCAST_ELEMENTS = 1 << 24     # stride-0 tensors may address more than their storage, up to this
_EXTRA_OUTPUT_BYTES = 1 << 27         # all tensors together: <= 4 x storage bytes + this
_MAX_NDIM = 32                        # numpy 1.x limit; real checkpoints have <= 5
_INT64 = 1 << 63
_HASH_BUDGET = 1 << 18                # tuple elements hashed as dict keys/set items, in all
_MAX_COLLIDABLE_KEYS = 4096           # keys whose hash an attacker can choose (floats, huge ints, -1/-2)
_MAX_NESTING = 100                    # load_ckpt: containers nested deeper are refused
_DEFLATE_MAX_RATIO = 1100             # deflate cannot expand more than ~1032:1
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, OSError,
               EOFError, ValueError, zlib.error, struct.error, OverflowError)


def _clip(text, limit=200):
    """An exception's message, cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _short(x, limit=160):
    """repr(x) cut to about ``limit`` characters; never walks much of x (DAGs, cycles, huge ints)."""
    out, left = [], [limit]

    def put(s):
        out.append(s)
        left[0] -= len(s)

    def walk(x, depth):
        if left[0] <= 0:
            return put("...")
        if isinstance(x, bool) or x is None:
            return put(repr(x))
        if isinstance(x, int):
            return put(repr(x) if x.bit_length() <= 256 else f"<{x.bit_length()}-bit int>")
        if isinstance(x, (str, bytes, bytearray)):
            return put(repr(x[:limit]) + ("..." if len(x) > limit else ""))
        if isinstance(x, (tuple, list, set, frozenset, dict)):
            opening, closing = "()" if isinstance(x, tuple) else "[]" if isinstance(x, list) else "{}"
            put(opening)
            if depth >= 4 and len(x):
                put("...")
            else:
                for i, item in enumerate(x.items() if isinstance(x, dict) else x):
                    if i:
                        put(", ")
                    if left[0] <= 0 or i >= 16:
                        put("...")
                        break
                    if isinstance(x, dict):
                        walk(item[0], depth + 1)
                        put(": ")
                        walk(item[1], depth + 1)
                    else:
                        walk(item, depth + 1)
            if isinstance(x, tuple) and len(x) == 1:
                put(",")
            return put(closing)
        try:
            return put(repr(x)[:limit])
        except Exception:  # noqa: BLE001 -- only ever used to build an error message
            return put(f"<{type(x).__name__}>")

    walk(x, 0)
    return "".join(out)


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

    def __call__(self, *args):  # X() and X()() are the same placeholder: names stay short
        return self if self.qualname.endswith("()") else _Inert(self.qualname + "()")

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
    if not _is_int(storage_offset) or not 0 <= storage_offset < _INT64:
        raise _Refused(f"tensor on storage {_short(storage.key)}: storage_offset {_short(storage_offset)} "
                       "must be a non-negative int64")
    for what, seq in (("size", size), ("stride", stride)):
        if not isinstance(seq, (tuple, list)) or not all(_is_int(v) and 0 <= v < _INT64 for v in seq):
            raise _Refused(f"tensor on storage {_short(storage.key)}: {what} {_short(seq)} "
                           "must be a tuple of non-negative int64s")
    if len(size) != len(stride):
        raise _Refused(f"tensor on storage {_short(storage.key)}: size {_short(tuple(size))} and stride "
                       f"{_short(tuple(stride))} have different lengths")
    if len(size) > _MAX_NDIM:
        raise _Refused(f"tensor on storage {_short(storage.key)} has {len(size)} dimensions; "
                       f"at most {_MAX_NDIM} are supported")
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
            raise _Refused(f"numpy.dtype({_short(name)}) is not allowed: only {sorted(_NP_SCALAR_DTYPES)}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _Refused(f"unexpected numpy.dtype state {_short(state)}")
        self.dtype = self.dtype.newbyteorder(state[1])


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Refused(f"numpy scalar needs an allowed dtype and exactly its itemsize of bytes, "
                       f"got {_short(dtype)}, {_short(data)}")
    return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode only allowed as (str, 'latin1'), got encoding {_short(encoding)}")
    return text.encode("latin1")


def _make_set(kind):
    def make(items=()):
        if not isinstance(items, (list, tuple)):
            raise _Refused(f"{kind.__name__}() expects a list, got {type(items).__name__}")
        _charge_hashing(items)
        return kind(items)
    return make


def _ordered_dict(*args):
    """collections.OrderedDict(): pickle calls it without arguments, then SETITEMS."""
    if args:
        if len(args) > 1 or not isinstance(args[0], (list, tuple, dict)):
            raise _Refused(f"collections.OrderedDict{_short(args)}: expected no arguments or one list of pairs")
        _charge_hashing(args[0].keys() if isinstance(args[0], dict) else
                        [p[0] if isinstance(p, tuple) and len(p) == 2 else p for p in args[0]])
    return _SafeOrderedDict(*args)


# ----------------------------------------------------------------------------- hashing budget
_active = threading.local()  # .unpickler: the _RestrictedUnpickler running in this thread


def _hash_cost(x, limit):
    """(tuple nodes that hashing x visits, attacker-collidable atoms in x); counting stops past limit.

    Only tuples are walked: frozensets cache their hash, everything else that can come out
    of data.pkl hashes in O(1) or is unhashable.  Collidable: floats, ints outside
    (-2**61, 2**61) and -1/-2 (hash(-1) == hash(-2)), numpy scalars -- many keys sharing one
    hash make a dict quadratic.
    """
    nodes = collidable = 0
    todo = [x]
    while todo:
        y = todo.pop()
        t = type(y)
        if t is tuple:
            nodes += 1 + len(y)
            if nodes > limit:
                break
            todo.extend(y)
        elif t is float or isinstance(y, np.generic) and not isinstance(y, np.bool_):
            collidable += 1
        elif t is int and (y in (-1, -2) or not -(1 << 61) < y < (1 << 61)):
            collidable += 1
    return nodes, collidable


def _charge_hashing(keys):
    unpickler = getattr(_active, "unpickler", None)
    if unpickler is not None:
        unpickler.charge(keys)


_STORAGES = {
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "u1",
}


def _build_allowed():
    allowed = {"collections.OrderedDict": _Global("collections.OrderedDict", _ordered_dict)}
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


_PyUnpickler = pickle._Unpickler  # the pure-Python unpickler: every opcode runs code we can check


class _RestrictedUnpickler(_PyUnpickler):
    """Unpickles data.pkl (bytes) with our stand-ins; bounds the work hashing keys costs."""

    dispatch = dict(_PyUnpickler.dispatch)

    def __init__(self, data, ckpt):
        self._bytes = io.BytesIO(data)
        super().__init__(self._bytes)
        self._ckpt = ckpt
        self._hash_left = _HASH_BUDGET
        self._collidable_left = _MAX_COLLIDABLE_KEYS

    @property
    def position(self):
        return self._bytes.tell()

    def load(self):
        _active.unpickler = self
        try:
            return super().load()
        finally:
            _active.unpickler = None

    def find_class(self, module, name):
        qualname = f"{module}.{name}"
        try:
            return ALLOWED_GLOBALS[qualname]
        except (KeyError, TypeError):
            raise _Refused(
                f"refusing global {_short(qualname)} in data.pkl: only tensor-rebuilding and inert globals "
                "are allowed (torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict, "
                "...; full list in weights_port.ckpt_reader.ALLOWED_GLOBALS). Nothing was executed; "
                "do not load this file with torch.load unless you trust it") from None

    def persistent_load(self, pid):
        return self._ckpt.storage_ref(pid)

    # -- everything that hashes keys/items checks the cost first
    def charge(self, keys):
        for k in keys:
            t = type(k)
            if t is str or t is bytes or t is bool or k is None:
                continue
            if t is int:
                nodes, collidable = 0, k in (-1, -2) or not -(1 << 61) < k < (1 << 61)
            else:
                nodes, collidable = _hash_cost(k, self._hash_left)
            self._hash_left -= nodes
            self._collidable_left -= collidable
            if self._collidable_left < 0:
                raise _Refused(f"more than {_MAX_COLLIDABLE_KEYS} dict keys/set items with "
                               "attacker-chosen hashes (floats, huge ints, -1/-2); refused to keep "
                               "loading fast")
            if self._hash_left < 0:
                raise _Refused(f"dict keys/set items too large to hash (more than "
                               f"{_HASH_BUDGET} tuple elements in all, e.g. {_short(k, 60)}); refused to keep "
                               "loading fast")

    def load_setitem(self):
        self.charge(self.stack[-2:-1])
        _PyUnpickler.load_setitem(self)
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        self.charge(self.stack[0::2])
        _PyUnpickler.load_setitems(self)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        self.charge(self.stack[0::2])
        _PyUnpickler.load_dict(self)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        self.charge(self.stack)
        _PyUnpickler.load_additems(self)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self.charge(self.stack)
        _PyUnpickler.load_frozenset(self)
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_put(self):
        i = int(self.readline()[:-1])
        if not 0 <= i < (1 << 32):
            raise _Refused(f"PUT memo index {_short(i)} out of range")
        self.memo[i] = self.stack[-1]
    dispatch[pickle.PUT[0]] = load_put


# ----------------------------------------------------------------------------- the zip file
class _CkptFile:
    def __init__(self, path):
        self.path = os.fspath(path)
        self._storages = {}  # key -> _StorageRef
        self._arrays = {}    # key -> 1-D np array (read once)
        self._storage_bytes = 0  # of all storages data.pkl refers to
        self._output_bytes = 0   # of the tensors materialised so far (in storage bytes)
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
        except _ZIP_ERRORS as e:  # NotImplementedError: "zip file version 12.7" (found by fuzzing)
            self._fail(f"not a zip-format PyTorch checkpoint (bad zip: {type(e).__name__}: "
                       f"{_clip(str(e))}). Re-save it with "
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
                self._fail(f"unsafe zip entry name {_short(n)} (absolute, '..' or backslash)")
        dupes = sorted(n for n, c in collections.Counter(names).items() if c > 1)
        if dupes:
            self._fail(f"duplicate zip entries {_short(dupes)}")
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            self._fail(f"expected exactly one '<folder>/data.pkl' entry, found {len(pkls)}: {_short(pkls)}")
        self.folder = pkls[0][: -len("/data.pkl")]
        stray = [n for n in names if n.split("/")[0] != self.folder or "/" not in n]
        if stray:
            self._fail(f"zip entries outside the checkpoint folder {_short(self.folder)}: {_short(stray[:5])}")
        self.infos = {i.filename: i for i in infos}
        bo = self.infos.get(f"{self.folder}/byteorder")
        if bo is not None:
            order = self.read_entry(bo, 64).decode("ascii", "replace").strip()
            if order != "little":
                self._fail(f"entry {_short(bo.filename)} says byteorder {_short(order)}; only 'little' is supported "
                           "(re-save the checkpoint on a little-endian machine)")

    def read_entry(self, info, limit, need=None):
        """All bytes of a stored or deflated entry (CRC checked), refused if it declares more than limit."""
        name = info.filename
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            self._fail(f"zip entry {_short(name)} uses compression method {info.compress_type}; only stored or "
                       "deflated entries are supported (torch.save writes stored ones)")
        if info.file_size > limit:
            self._fail(f"zip entry {_short(name)} declares {info.file_size} bytes, more than the {limit} allowed")
        if info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
            self._fail(f"zip entry {_short(name)} claims {info.file_size} bytes from {info.compress_size} "
                       "compressed bytes, more than deflate can produce")
        try:
            with self.zip.open(info) as f:
                data = f.read()
        except _ZIP_ERRORS as e:
            self._fail(f"cannot read zip entry {_short(name)}: {type(e).__name__}: {_clip(str(e))}")
        if len(data) != info.file_size:
            self._fail(f"zip entry {_short(name)} has {len(data)} bytes, its directory record says {info.file_size}")
        return data

    # -- unpickling
    def load_tree(self):
        name = f"{self.folder}/data.pkl"
        data = self.read_entry(self.infos[name], MAX_PICKLE_BYTES)
        unpickler = None
        try:
            unpickler = _RestrictedUnpickler(data, self)
            return unpickler.load()
        except _Refused as e:
            self._fail(str(e))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- the unpickler only runs our stand-ins: all of it is "malformed"
            where = f" at byte {unpickler.position}" if unpickler is not None else ""
            self._fail(f"malformed {name}{where}: {type(e).__name__}: {_clip(str(e))}")

    def storage_ref(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[0], str) and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {_short(pid)}: expected "
                           "('storage', storage_type, key, location, numel)")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise _Refused(f"persistent id {_short(pid)}: {_short(stype)} is not a supported storage type "
                           f"(allowed: {', '.join('torch.' + s for s in _STORAGES)})")
        if not isinstance(key, str) or not isinstance(location, str) or not _is_int(numel) \
                or not 0 <= numel < _INT64:
            raise _Refused(f"malformed persistent id {_short(pid)}")
        ref = self._storages.get(key)
        if ref is not None:
            if ref.type is not stype or ref.numel != numel:
                raise _Refused(f"storage {_short(key)} is used as both {ref.type}[{ref.numel}] "
                               f"and {stype}[{numel}]")
            return ref
        entry = f"{self.folder}/data/{key}"
        info = self.infos.get(entry)
        if info is None:
            raise _Refused(f"storage {_short(key)}: zip entry {_short(entry)} is missing")
        need = numel * stype.dtype.itemsize
        if info.file_size < need:
            raise _Refused(f"storage {_short(key)}: entry {_short(entry)} has {info.file_size} bytes but "
                           f"{numel} x {stype} needs {need}")
        ref = self._storages[key] = _StorageRef(stype, key, numel, info)
        self._storage_bytes += need
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
            start, nbytes = self._data_offset(info), ref.numel * dtype.itemsize
            raw = self._map[start:start + nbytes]
            if raw.size != nbytes:
                self._fail(f"zip entry {_short(info.filename)} runs past the end of the file")
            arr = raw.view(dtype)
        else:  # deflated (anything else is refused by read_entry)
            data = self.read_entry(info, info.file_size)
            arr = np.frombuffer(data, dtype, count=ref.numel)
        self._arrays[ref.key] = arr
        return arr

    def _data_offset(self, info):
        """Where an uncompressed entry's bytes start (after its local header)."""
        m = self._map
        h = info.header_offset
        if h < 0 or h + 30 > len(m) or bytes(m[h:h + 4]) != b"PK\x03\x04":
            self._fail(f"bad local header for zip entry {_short(info.filename)}")
        name_len, extra_len = struct.unpack("<HH", bytes(m[h + 26:h + 30]))
        raw = bytes(m[h + 30:h + 30 + name_len])
        name = raw.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
        start = h + 30 + name_len + extra_len
        if name != info.orig_filename or start + info.file_size > len(m) or info.compress_size != info.file_size \
                or info.file_size < 0:
            self._fail(f"zip entry {_short(info.filename)}: local header does not match the directory")
        return start

    def tensor(self, ref, name):
        """The array of a tensor record; ``name``: its key, or a _Path (formatted only for errors)."""
        st = ref.storage
        size, itemsize = ref.size, st.type.dtype.itemsize
        numel = math.prod(size)
        if numel == 0:
            if math.prod(n for n in size if n) * itemsize >= _INT64:
                self._fail(f"tensor {_short(str(name), 200)}: size {_short(size)} is too large")
            return _finish(np.empty(size, st.type.dtype), st.type)
        stride = tuple(0 if n == 1 else s for n, s in zip(size, ref.stride))  # unused strides may be huge
        last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.numel:
            self._fail(f"tensor {_short(str(name), 200)} (offset {ref.offset}, size {_short(size)}, stride "
                       f"{_short(ref.stride)}) addresses element {_short(last)} but storage {_short(st.key)} "
                       f"has only {st.numel} elements")
        if numel > st.numel:
            if numel > _MAX_BROADCAST_ELEMENTS:
                self._fail(f"tensor {_short(str(name), 200)} has {_short(numel)} elements, far more than its storage "
                           f"{_short(st.key)} ({st.numel})")
        self._output_bytes += numel * itemsize
        if self._output_bytes > 4 * self._storage_bytes + _EXTRA_OUTPUT_BYTES:
            self._fail(f"tensor {_short(str(name), 200)}: the tensors add up to {self._output_bytes} bytes, more than "
                       f"4 x the {self._storage_bytes} bytes of their storages (+{_EXTRA_OUTPUT_BYTES}); "
                       "refused to keep memory bounded")
        base = self._storage_array(st)[ref.offset:]
        view = np.lib.stride_tricks.as_strided(
            base, shape=size, strides=[s * itemsize for s in stride], writeable=False)
        return _finish(view.copy(), st.type)


def _finish(arr, stype):
    """Storage dtype -> returned dtype: bfloat16 -> float32, bool bytes -> bool, native byte order.

    Always an ndarray (ufuncs would turn 0-d arrays into numpy scalars).
    """
    if stype.name == "torch.BFloat16Storage":
        wide = arr.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    if stype.name == "torch.BoolStorage":
        return arr.astype(bool)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


class _Path:
    """Where a value sits in the tree (parent, key); formatted only when an error needs it."""

    __slots__ = ("parent", "key")

    def __init__(self, parent, key):
        self.parent, self.key = parent, key

    def __str__(self):
        parts, node = [], self
        while node is not None:
            parts.append(node.key if isinstance(node.key, int) and not isinstance(node.key, bool)
                         else _short(node.key, 40) if not isinstance(node.key, str) else node.key)
            node = node.parent
        parts.reverse()
        out = ""
        for p in parts:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
        return out if len(out) < 400 else out[:190] + "..." + out[-190:]


def _materialize(tree, ckpt, path=None, memo=None, depth=0):
    """Replace tensor records by arrays; shared/cyclic containers are visited once."""
    memo = {} if memo is None else memo
    if id(tree) in memo:
        return memo[id(tree)]
    if isinstance(tree, (dict, list, tuple)) and depth >= _MAX_NESTING:
        ckpt._fail(f"containers nested more than {_MAX_NESTING} deep at {_short(str(path), 200)}")
    if isinstance(tree, _TensorRef):
        out = ckpt.tensor(tree, path)
    elif isinstance(tree, dict):
        out = memo[id(tree)] = {}
        for k, v in tree.items():
            out[k] = _materialize(v, ckpt, _Path(path, k), memo, depth + 1)
    elif isinstance(tree, list):
        out = memo[id(tree)] = []
        for i, v in enumerate(tree):
            out.append(_materialize(v, ckpt, _Path(path, i), memo, depth + 1))
    elif isinstance(tree, tuple):
        out = tuple([_materialize(v, ckpt, _Path(path, i), memo, depth + 1) for i, v in enumerate(tree)])
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
                    ckpt._fail(f"tensor key {_short(k)} is not a string")
                out[k] = ckpt.tensor(v, k)
        if not out:
            ckpt._fail("no tensors found (expected a state dict, or a dict with 'state_dict')")
        return out
    finally:
        ckpt.close()
