"""Property-based fuzzing of the checkpoint readers (issue 7, "Checkpoint reading").

Every generated file must give one of two outcomes:

* accepted: ``{str: np.ndarray}`` (checked against an independent oracle where the
  generator knows the answer), or
* refused: :class:`CheckpointError` whose message names the file.

Nothing else may escape (MemoryError, OverflowError, RecursionError, struct.error,
zipfile.BadZipFile, zlib.error, UnicodeDecodeError, KeyError, IndexError,
pickle.UnpicklingError, a ValueError that is not a CheckpointError, ...).  On top of that:

* no payload runs: every pickle may carry calls (``os.system``, ``exec``, ``open``,
  ``subprocess.call``, ``os.mkdir``, ...) whose side effect would create a marker
  file; the marker must never exist;
* memory stays bounded: the tracemalloc peak of one read (numpy registers its buffers
  there) must stay below ``_mem_bound(file size)``, so files that *declare* huge tensors
  are refused before anything is allocated;
* each case is fast: the hypothesis deadline (2 s) catches hangs and blow-ups.

Generators: (a) structured -- valid files mutated at the byte level in chosen regions
(zip local headers, data.pkl, storages, central directory, end record; safetensors length
field, header, buffer), pickles mutated opcode by opcode, pickles generated from a grammar
(GLOBAL/STACK_GLOBAL/INST/OBJ/NEWOBJ with allowed, dangerous and random names, REDUCE,
BUILD, memo PUT/GET, persistent ids with random tuples, tensor rebuilds with hostile
geometry, sets, frames, junk opcodes), exponential memo DAGs, zip-entry layouts, random
JSON headers (wrong dtypes, bad shapes, overlapping/gapped/out-of-file offsets, duplicate
keys, nested junk); (b) random bytes behind valid magic prefixes.  The heavier generators
read their decisions from one hypothesis-drawn byte string (``_Choices``, like atheris'
FuzzedDataProvider): several times faster than composing strategies, still shrinkable.

The ``test_found_*`` tests at the end pin the concrete files behind each bug the fuzzers
(or the review that came with them) found in the readers as first written.

Profiles (registered here, nothing global): ``diffusion-tf-fuzz-ci`` (default; about
3000 cases in total, derandomized so CI is reproducible) and ``diffusion-tf-fuzz-long``,
chosen by ``DIFFUSION_TF_FUZZ_EXAMPLES=N`` (N cases in total, split between the tests by
the same weights, random seed).  Run with ``-s`` to see the per-test counts of accepted
and refused files (``DIFFUSION_TF_FUZZ_REASONS=1``: also the commonest refusal messages;
``DIFFUSION_TF_FUZZ_COLLECT=<dir>``: triage mode, escapes are counted and their files saved
instead of stopping at the first).  See docs/fuzzing.md.
"""
from __future__ import annotations

import collections
import faulthandler
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from support.torch_format import (
    Global, Persistent, Reduce, TorchTensor, module_state_dict, pickle_bytes, torch_zip_entries,
)
from weights_port.checkpoint import read_checkpoint
from weights_port.ckpt_reader import ALLOWED_GLOBALS, load_ckpt, read_ckpt
from weights_port.errors import CheckpointError
from weights_port.safetensors_reader import MAX_HEADER_BYTES, read_safetensors, read_safetensors_metadata

# ----------------------------------------------------------------------------- profiles
_CI_TOTAL = 3000
_LONG_TOTAL = int(os.environ.get("DIFFUSION_TF_FUZZ_EXAMPLES", "0") or 0)
_TOTAL = _LONG_TOTAL or _CI_TOTAL
_COMMON = dict(deadline=2000, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.large_base_example])
settings.register_profile("diffusion-tf-fuzz-ci", derandomize=True, **_COMMON)
settings.register_profile("diffusion-tf-fuzz-long", derandomize=False, **_COMMON)
_PROFILE = settings.get_profile("diffusion-tf-fuzz-long" if _LONG_TOTAL else "diffusion-tf-fuzz-ci")
if os.environ.get("DIFFUSION_TF_FUZZ_COLLECT"):  # triage: no shrinking
    _PROFILE = settings(_PROFILE, phases=[Phase.explicit, Phase.reuse, Phase.generate])

#: share of the total number of cases per test (sums to 1)
_WEIGHTS = {
    "ckpt_zip_bytes": 0.12, "ckpt_zip_entries": 0.07, "ckpt_pickle_ops": 0.10, "ckpt_pickle_grammar": 0.17,
    "ckpt_memo_dag": 0.03, "ckpt_tensor_geometry": 0.12, "ckpt_random_bytes": 0.05,
    "st_bytes": 0.10, "st_json_header": 0.17, "st_random_bytes": 0.07,
}
assert abs(sum(_WEIGHTS.values()) - 1) < 1e-9


def _fuzz(name):
    return settings(_PROFILE, max_examples=max(10, round(_TOTAL * _WEIGHTS[name])))


# ----------------------------------------------------------------------------- harness
_DIR = tempfile.mkdtemp(prefix="diffusion-tf-fuzz-")
MARKER = os.path.join(_DIR, "pwned")   # what every command payload would create
_STATS = collections.Counter()         # (test, outcome) -> cases
#: DIFFUSION_TF_FUZZ_COLLECT=<folder>: record escapes (and save the files there) instead of stopping at
#: the first; the module fails at the end if there were any.  For triage runs.
_COLLECT = os.environ.get("DIFFUSION_TF_FUZZ_COLLECT")
_ESCAPES = collections.Counter()       # (exception type, where) -> count
_TIMES = collections.Counter()
_REASONS = collections.defaultdict(collections.Counter)  # test -> refusal message shape -> cases


def _reason(message, path):
    """A refusal message with the file name, quoted values and numbers masked: its 'shape'."""
    text = message.replace(path, "").lstrip(": ")
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\(.*?\)|\[.*?\]|-?\d+", "_", text)
    return text[:60]


@pytest.fixture(scope="module", autouse=True)
def _report():
    t0 = time.perf_counter()
    yield
    shutil.rmtree(_DIR, ignore_errors=True)
    total = sum(_STATS.values())
    lines = [f"fuzz_readers: {total} cases in {time.perf_counter() - t0:.1f} s "
             f"(profile {'long' if _LONG_TOTAL else 'ci'}, target {_TOTAL})"]
    for test in sorted({t for t, _ in _STATS}):
        acc, ref, esc = (_STATS[test, k] for k in ("accepted", "refused", "escaped"))
        lines.append(f"  {test:24s} {acc + ref + esc:7d} cases: {acc:6d} accepted, {ref:6d} refused, "
                     f"slowest {_TIMES[test] * 1000:.0f} ms" + (f", {esc} ESCAPED" if esc else ""))
        if os.environ.get("DIFFUSION_TF_FUZZ_REASONS"):
            lines += [f"      {n:6d} x {r}" for r, n in _REASONS[test].most_common(12)]
    for (kind, where), n in sorted(_ESCAPES.items()):
        lines.append(f"  ESCAPE {n:5d} x {kind} at {where}")
    print("\n" + "\n".join(lines))
    assert not _ESCAPES, "exceptions other than CheckpointError escaped (see above)"


_HANG_S = 60  # a case still running after this long kills the process (with tracebacks)


def _mem_bound(size):
    # the readers copy each tensor once (plus a bfloat16 widening); broadcast (stride-0)
    # tensors may add up to 2**24 elements each, 2**27 bytes in all -- generous headroom
    return 64 * size + (512 << 20)


def _run(test, reader, path):
    """reader(path): accepted -> the result; refused (CheckpointError) -> None; else raise."""
    assert not os.path.exists(MARKER)
    size = os.path.getsize(path)
    faulthandler.dump_traceback_later(_HANG_S, exit=True)  # a hang in C code: die loudly, never stall CI
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = reader(path)
        outcome = "accepted"
    except CheckpointError as e:
        assert os.path.basename(path) in str(e), f"message does not name the file: {e}"
        assert len(str(e)) < 20000, f"unbounded message ({len(str(e))} chars)"
        out, outcome = None, "refused"
        _REASONS[test][_reason(str(e), path)] += 1
    except Exception as e:
        if not _COLLECT:
            raise
        import traceback
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "weights_port" in f.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        key = (type(e).__name__, where)
        _ESCAPES[key] += 1
        if _ESCAPES[key] <= 3:
            os.makedirs(_COLLECT, exist_ok=True)
            shutil.copy(path, os.path.join(_COLLECT, f"{key[0]}-{where.replace(':', '-')}-{_ESCAPES[key]}"
                                                     f"{os.path.splitext(path)[1]}"))
        out, outcome = None, "escaped"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
        _TIMES[test] = max(_TIMES[test], time.perf_counter() - t0)
    assert not os.path.exists(MARKER), "a payload in the file was executed"
    assert peak <= _mem_bound(size), f"{reader.__name__} allocated {peak} bytes for a {size}-byte file"
    _STATS[test, outcome] += 1
    return out


def _check_tensors(out):
    assert isinstance(out, dict)
    for k, v in out.items():
        assert isinstance(k, str), k
        assert type(v) is np.ndarray, (k, type(v))
        assert v.dtype.isnative and v.dtype.kind in "fiub", (k, v.dtype)


def _write(name, data):
    path = os.path.join(_DIR, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- shared strategies
_HUGE = [2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
         2 ** 64, 2 ** 100, -1, -2, -2 ** 31, -2 ** 63, -2 ** 63 - 1, -2 ** 64]
_UINT_FIELDS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]


def _regions_mutation():
    """Byte mutations, each (kind, region index, relative position, value, blob)."""
    return st.lists(st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "u16", "u32", "u64", "dup"]),
        st.integers(0, 64), st.floats(0, 1), st.integers(0, 1 << 16), st.binary(max_size=16)),
        min_size=1, max_size=4)


def _apply(data, regions, mutations, extra_ints=()):
    buf = bytearray(data)
    ints = _UINT_FIELDS + list(extra_ints)
    for kind, ri, where, val, blob in mutations:
        a, b = regions[ri % len(regions)]
        a, b = min(a, len(buf)), min(max(a, b), len(buf))
        pos = a + int(where * max(b - a - 1, 0))
        if kind == "flip":
            if pos < len(buf):
                buf[pos] ^= (val & 0xFF) or 1
        elif kind == "set":
            buf[pos:pos + 1] = bytes([val & 0xFF])
        elif kind == "insert":
            buf[pos:pos] = blob
        elif kind == "delete":
            del buf[pos:pos + 1 + val % 32]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "dup":
            buf[pos:pos] = buf[a:b][: 1 + val % 64]
        else:
            n = {"u16": 2, "u32": 4, "u64": 8}[kind]
            buf[pos:pos + n] = (ints[val % len(ints)] % (1 << (8 * n))).to_bytes(n, "little")
    return bytes(buf)


# ----------------------------------------------------------------------------- pickle assembler
def _p_int(v):
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2 ** 31 <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))) + raw


def _p_str(s):
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_bytes(b):
    return (b"C" + bytes([len(b)]) if len(b) < 256 else b"B" + struct.pack("<I", len(b))) + b


def _p_global(mod, name, style="GLOBAL"):
    if style == "STACK_GLOBAL":
        return _p_str(mod) + _p_str(name) + b"\x93"
    return b"c" + mod.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n"


def _p_tuple(items):
    if len(items) <= 3:
        return b"".join(items) + [b")", b"\x85", b"\x86", b"\x87"][len(items)]
    return b"(" + b"".join(items) + b"t"


def _p_list(items):
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def _p_dict(pairs):
    return b"}" + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def _p_reduce(func, args):
    return func + _p_tuple(args) + b"R"


def _p_wrap(body, protocol):
    return (b"\x80" + bytes([protocol]) if protocol >= 2 else b"") + body + b"."


def _payloads(marker):
    """(module, name, args): each creates ``marker`` when called (checked in a control test)."""
    m = marker
    return [
        ("posix", "system", (f"touch '{m}'",)), ("os", "system", (f"touch '{m}'",)),
        ("builtins", "exec", (f"open({m!r}, 'w').close()",)),
        ("__builtin__", "eval", (f"open({m!r}, 'w').close()",)),
        ("builtins", "eval", (f"__import__('os').mkdir({m!r})",)),
        ("builtins", "open", (m, "w")), ("io", "open", (m, "w")), ("_io", "open", (m, "w")),
        ("subprocess", "call", (["touch", m],)), ("subprocess", "check_output", (["touch", m],)),
        ("os", "mkdir", (m,)), ("posix", "mkdir", (m,)), ("os", "makedirs", (m,)),
        ("shutil", "copyfile", (sys.executable, m)),
    ]


_PAYLOADS = _payloads(MARKER)

_ALLOWED = [tuple(q.rsplit(".", 1)) for q in ALLOWED_GLOBALS]
_STORAGE_GLOBALS = [g for g in _ALLOWED if g[0] == "torch"]
_OPCODE_BYTES = sorted({op.code.encode("latin1") for op in pickletools.opcodes})
_ALPHABET = list("a0/.\n :_-\\") + ["\x00", "\xe9", "\u2603", "\U0001f600", "\ud800", "storage", "cpu", ".."]


class _Choices:
    """Decisions read from one hypothesis-drawn byte string, like atheris' FuzzedDataProvider.

    One cheap draw per case instead of hundreds of strategy draws (several times faster), and
    hypothesis still mutates and shrinks the bytes; exhausted or zero bytes mean the simplest
    choice (a leaf, a small int, an empty container), so shrinking simplifies the structure.
    """

    def __init__(self, data):
        self.data, self.pos = data, 0

    def below(self, n):
        """0 .. n-1."""
        if n <= 1:
            return 0
        k = 1 if n <= 256 else (n.bit_length() + 7) // 8
        raw = self.data[self.pos:self.pos + k]
        self.pos += k
        return int.from_bytes(raw, "little") % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def flag(self, one_in=2):
        return self.below(one_in) == one_in - 1

    def integer(self):
        kind = self.below(8)
        if kind < 4:
            return self.below(28) - 3
        if kind < 6:
            return self.pick(_HUGE)
        if kind == 6:
            return self.below(1 << 16)
        return int.from_bytes(self.blob(9), "little", signed=True)

    def text(self, n=8):
        return "".join(self.pick(_ALPHABET) for _ in range(self.below(n + 1)))

    def blob(self, n=8):
        k = self.below(n + 1)
        out = self.data[self.pos:self.pos + k]
        self.pos += k
        return out + bytes(k - len(out))


_CHOICES = st.binary(min_size=32, max_size=2000)

# ----------------------------------------------------------------------------- pickle grammar
_DANGEROUS = [(m, n) for m, n, _ in _PAYLOADS] + [
    ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "compile"), ("builtins", "globals"),
    ("__builtin__", "getattr"), ("builtins", "setattr"), ("builtins", "type"), ("builtins", "object"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "bytearray"), ("builtins", "range"),
    ("subprocess", "Popen"), ("os", "popen"), ("nt", "system"), ("pty", "spawn"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "load"),
    ("numpy", "frombuffer"), ("torch", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.storage", "_load_from_bytes"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch.nn.modules.linear", "Linear"), ("torch", "ComplexFloatStorage"),
    ("collections", "defaultdict"), ("collections", "Counter"), ("functools", "partial"),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("operator", "getitem"),
    ("pickle", "loads"), ("_pickle", "loads"), ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
    ("types", "FunctionType"), ("types", "CodeType"), ("runpy", "_run_code"), ("webbrowser", "open"),
    ("shutil", "rmtree"), ("pdb", "run"), ("timeit", "timeit"), ("code", "InteractiveInterpreter"),
    ("codecs", "encode"), ("_codecs", "decode"), ("pytorch_lightning.callbacks", "ModelCheckpoint"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_qtensor"),
    ("torch", "FloatStorage.__init__"), ("collections", "OrderedDict.fromkeys"), ("os", ""), ("", ""),
    ("collections\nOrderedDict", "x"), ("builtins", "set.__init__"), ("torch._utils", "_rebuild_tensor_v2 "),
]
# storages present in the grammar's zip: key -> (storage type, numel, numpy dtype)
_GRAMMAR_STORAGES = {"0": ("FloatStorage", 16, "<f4"), "1": ("HalfStorage", 8, "<f2"),
                     "2": ("BFloat16Storage", 4, "<u2"), "3": ("LongStorage", 2, "<i8")}
_REBUILD_FUNCS = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")]


def _p_value(v):
    if v is None:
        return b"N"
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        return _p_int(v)
    if isinstance(v, str):
        return _p_str(v)
    if isinstance(v, (list, tuple)):
        items = [_p_value(x) for x in v]
        return _p_list(items) if isinstance(v, list) else _p_tuple(items)
    raise TypeError(type(v))


def _p_payload(call, style):
    """A call of a _PAYLOADS entry in one of four opcode styles."""
    mod, name, args = call
    if style == "INST":
        return b"(" + b"".join(_p_value(a) for a in args) + b"i" + f"{mod}\n{name}\n".encode()
    if style == "OBJ":
        return b"(" + _p_global(mod, name) + b"".join(_p_value(a) for a in args) + b"o"
    return _p_reduce(_p_global(mod, name, style), [_p_value(a) for a in args])


def _valid_pid(key):
    stype, numel, _ = _GRAMMAR_STORAGES[key]
    return _p_tuple([_p_str("storage"), _p_global("torch", stype), _p_str(key), _p_str("cpu"), _p_int(numel)])


def _g_float(c):
    return b"G" + struct.pack(">d", c.pick([0.0, 1.5, -2.0, float("inf"), float("nan"), 1e300, 2.0 ** 63]))


def _g_global(c):
    k = c.below(3)
    mod, name = c.pick(_ALLOWED) if k == 0 else c.pick(_DANGEROUS) if k == 1 else (c.text(), c.text())
    return _p_global(mod, name, "STACK_GLOBAL" if c.flag() else "GLOBAL")


def _g_payload(c):
    return _p_payload(c.pick(_PAYLOADS), c.pick(["GLOBAL", "STACK_GLOBAL", "INST", "OBJ"]))


def _g_pid(c):
    """Bytes pushing a persistent-id tuple: valid, or with random parts."""
    if c.below(3) == 0:
        return _valid_pid(c.pick(list(_GRAMMAR_STORAGES)))
    tag = c.pick([_p_str("storage"), _p_str("module"), b"N", _p_int(0)])
    stype = c.pick([lambda: _p_global(*c.pick(_STORAGE_GLOBALS)), lambda: _g_global(c),
                    lambda: _p_str(c.text()), lambda: b"N", lambda: _p_int(c.integer())])()
    key = c.pick([lambda: _p_str(c.pick(list(_GRAMMAR_STORAGES) + ["missing", "../0", "0/..", ""])),
                  lambda: _p_int(c.integer()), lambda: b"N", lambda: _p_bytes(c.blob(4))])()
    loc = c.pick([_p_str("cpu"), _p_str("cuda:0"), b"N", _p_int(3)])
    items = [tag, stype, key, loc, _p_int(c.integer())]
    if c.flag(8):
        items = items[:c.below(6)] + [b"N"] * c.below(2)
    return _p_tuple(items)


def _g_persistent(c):
    if c.flag(6):  # protocol-0 PERSID: a text id
        return b"P" + c.text().replace("\n", "").encode("utf-8", "surrogatepass") + b"\n"
    return _g_pid(c) + b"Q"


def _g_geom_int(c):
    return c.pick([lambda: _p_int(c.integer()), lambda: _p_int(c.integer()), lambda: b"N", lambda: _g_float(c),
                   lambda: b"\x88", lambda: _p_str(c.text(3))])()


def _g_seq(c):
    """A size/stride argument: ints (tuple or list), odd values, 60-80 dimensions, or not a sequence."""
    k = c.below(6)
    if k <= 1:
        items = [_p_int(c.integer()) for _ in range(c.below(6))]
        return _p_tuple(items) if k == 0 else _p_list(items)
    if k == 2:
        return _p_tuple([_g_geom_int(c) for _ in range(c.below(4))])
    if k == 3:
        return _p_tuple([_p_int(1)] * (60 + c.below(21)))
    return _g_geom_int(c)


def _g_rebuild(c, storage=None):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
    func = _p_global(*c.pick(_REBUILD_FUNCS), "STACK_GLOBAL" if c.flag(4) else "GLOBAL")
    storage = storage if storage is not None else _g_persistent(c)
    if c.flag():  # sizes and strides of one length
        n = c.below(5)
        size = _p_tuple([_p_int(c.integer()) for _ in range(n)])
        stride = _p_tuple([_p_int(c.integer()) for _ in range(n)])
    else:
        size, stride = _g_seq(c), _g_seq(c)
    args = [storage, _g_geom_int(c), size, stride, b"\x89", _p_reduce(_p_global("collections", "OrderedDict"), [])]
    if c.flag(10):
        args = args[:c.below(8)] + [b"N"] * c.below(2)
    node = _p_reduce(func, args)
    if c.flag(5):
        node = _p_reduce(_p_global("torch._utils", "_rebuild_parameter"), [node, b"\x88", _p_dict([])])
    return node


def _g_leaf(c):
    return c.pick([
        lambda: _p_int(c.integer()), lambda: _g_float(c), lambda: _p_str(c.text()), lambda: _p_bytes(c.blob()),
        lambda: c.pick([b"N", b"\x88", b"\x89", b"}", b"]", b")", b"\x8f"]),  # None, bools, empty containers
        lambda: _g_global(c), lambda: _g_persistent(c), lambda: _g_payload(c),
        lambda: b"h" + bytes([c.below(8)]),                                   # BINGET
        lambda: _g_rebuild(c),
    ])()


def _g_obj(c, depth=0):
    """Bytes that push (usually) one object."""
    if depth >= 4 or c.below(3) == 0:
        return _g_leaf(c)

    def kids():
        return [_g_obj(c, depth + 1) for _ in range(c.below(5))]

    def one():
        return _g_obj(c, depth + 1)

    return c.pick([
        lambda: _p_tuple(kids()), lambda: _p_list(kids()),
        lambda: _p_dict([(one(), one()) for _ in range(c.below(4))]),
        lambda: _p_reduce(_g_global(c) if c.flag() else one(), kids()),
        lambda: one() + one() + b"b",                                          # BUILD
        lambda: _p_tuple(kids()) + b"Q",                                       # BINPERSID of any tuple
        lambda: one() + b"q" + bytes([c.below(8)]),                            # BINPUT
        lambda: b"\x8f(" + b"".join(kids()) + b"\x90",                         # EMPTY_SET ADDITEMS
        lambda: b"(" + b"".join(kids()) + b"\x91",                             # FROZENSET
        lambda: b"(" + (_g_global(c) if c.flag() else one()) + b"".join(kids()) + b"o",   # OBJ
        lambda: (_g_global(c) if c.flag() else one()) + _p_tuple(kids()) + b"\x81",       # NEWOBJ
        lambda: one() + b"\x94h" + bytes([c.below(4)]) + b"h" + bytes([c.below(4)]) + b"\x86",  # MEMOIZE, shared
        lambda: _g_rebuild(c, one() + b"Q"),
    ])()


def _g_pickle(c):
    """A whole data.pkl: a state dict mixing valid tensors and generated objects, maybe corrupted."""
    protocol = c.pick([2, 0, 2, 3, 4, 5, 2])
    pairs = []
    for i in range(c.below(5)):
        key = _p_str(f"t{i}") if c.below(3) == 0 else _p_str(c.text(6)) if c.flag() else _g_obj(c, 2)
        pairs.append((key, _g_obj(c)))
    for _ in range(c.below(3)):
        key = c.pick(list(_GRAMMAR_STORAGES))
        pairs.append((_p_str(f"ok{key}"), _p_reduce(_p_global("torch._utils", "_rebuild_tensor_v2"), [
            _valid_pid(key) + b"Q", _p_int(0), _p_tuple([_p_int(2)]), _p_tuple([_p_int(1)]), b"\x89", b"N"])))
    for i in range(len(pairs) - 1, 0, -1):
        j = c.below(i + 1)
        pairs[i], pairs[j] = pairs[j], pairs[i]
    top = _p_dict(pairs)
    if c.flag():
        top = _p_dict([(_p_str("state_dict"), top), (_p_str("epoch"), _p_int(1))])
    if c.flag(4):  # the top-level object itself is generated
        top = _g_obj(c)
    body = bytearray(top)
    if protocol >= 4 and c.flag():  # a FRAME with a right or wrong length
        n = len(body) + 1 + c.pick([0, 0, -1, 1, 2 ** 40, -len(body) - 1])
        body[0:0] = b"\x95" + struct.pack("<q", n)
    if c.flag(3):  # junk opcodes with random arguments
        for _ in range(1 + c.below(2)):
            pos = c.below(len(body) + 1)
            body[pos:pos] = c.pick(_OPCODE_BYTES) + c.blob(9)
    data = _p_wrap(bytes(body), protocol)
    if c.flag(10):
        data = data[:c.below(len(data) + 1)]
    return data


def _grammar_storage_entries(archive="archive"):
    entries = {}
    rng = np.random.default_rng(0)
    for key, (_, numel, dtype) in _GRAMMAR_STORAGES.items():
        entries[f"{archive}/data/{key}"] = rng.integers(0, 255, numel * np.dtype(dtype).itemsize, np.uint8).tobytes()
    entries[f"{archive}/version"] = b"3\n"
    return entries


def _zip_bytes(entries, compression=zipfile.ZIP_STORED):
    """entries: name -> bytes or list of pairs; compression: one method or name -> method."""
    buf = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in items:
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = compression.get(name, 0) if isinstance(compression, dict) else compression
            with _quiet():
                z.writestr(info, data)
    return buf.getvalue()


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _zip_regions(data):
    """(start, end) byte ranges: local headers, data.pkl bytes, storage bytes, other entries,
    central directory, end record."""
    z = zipfile.ZipFile(io.BytesIO(data))
    regions = collections.defaultdict(list)
    for i in z.infolist():
        h = i.header_offset
        name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
        start = h + 30 + name_len + extra_len
        regions["local header"].append((h, start))
        kind = "pickle" if i.filename.endswith("data.pkl") else "storage" if "/data/" in i.filename else "other"
        regions[kind].append((start, start + i.compress_size))
    regions["central directory"].append((z.start_dir, len(data) - 22))
    regions["end record"].append((len(data) - 22, len(data)))
    return [r for name in sorted(regions) for r in regions[name]]


# ----------------------------------------------------------------------------- valid checkpoints
_DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


@st.composite
def _tensor_dicts(draw):
    tensors = {}
    shared = np.arange(draw(st.integers(1, 24)), dtype=np.float32)
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "view", "bf16", "param", "empty"]))
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
        if kind == "view":
            n = draw(st.integers(1, shared.size))
            off = draw(st.integers(0, shared.size - n))
            tensors[f"v{i}"] = TorchTensor(shared, off, (n,), (1,))
        elif kind == "bf16":
            tensors[f"b{i}"] = TorchTensor(np.arange(int(np.prod(shape)), dtype=np.uint16).reshape(-1), 0, shape,
                                           bfloat16=True)
        elif kind == "param":
            tensors[f"p{i}"] = TorchTensor(np.ones(int(np.prod(shape)), np.float32), 0, shape, parameter=True)
        elif kind == "empty":
            tensors[f"e{i}"] = np.zeros((0,) + shape, np.float32)
        else:
            dtype = draw(st.sampled_from(_DTYPES))
            tensors[f"t{i}"] = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    return tensors


@st.composite
def _valid_ckpt_entries(draw):
    tensors = draw(_tensor_dicts())
    wrap = draw(st.booleans())
    archive = draw(st.sampled_from(["archive", "v1-5-pruned", "a"]))
    if draw(st.booleans()):
        tensors = module_state_dict(tensors)
    extra = {"epoch": 3, "global_step": 7} if wrap and draw(st.booleans()) else None
    return torch_zip_entries(tensors, wrap_in_state_dict=wrap, archive_name=archive, extra=extra)


_COMPRESSIONS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]


# ============================================================================= .ckpt tests
@_fuzz("ckpt_zip_bytes")
@given(entries=_valid_ckpt_entries(), compression=st.sampled_from(_COMPRESSIONS[:2] * 3 + _COMPRESSIONS[2:]),
       mutations=_regions_mutation())
def test_ckpt_zip_byte_mutations(entries, compression, mutations):
    """Valid torch zips with flipped/inserted/deleted/overwritten bytes anywhere in the zip."""
    data = _zip_bytes(entries, compression)
    bad = _apply(data, _zip_regions(data), mutations, extra_ints=[len(data), len(data) + 1, len(data) - 22])
    path = _write("zb.ckpt", bad)
    out = _run("ckpt_zip_bytes", read_ckpt, path)
    if out is not None:
        _check_tensors(out)


_NAMES = st.one_of(st.sampled_from(["archive/data.pkl", "archive/data/0", "archive/byteorder", "other/data.pkl",
                                    "archive/../x", "/abs/data.pkl", "archive\\data.pkl", "C:/x", "archive",
                                    "archive/", "data.pkl", "archive/data/0/..", "archive/.data/serialization_id",
                                    "archive/data/99", "archive//data.pkl"]),
                   st.text(max_size=20))


@_fuzz("ckpt_zip_entries")
@given(entries=_valid_ckpt_entries(), ops=st.lists(st.tuples(
    st.sampled_from(["add", "drop", "rename", "dup", "byteorder", "resize", "swap"]), _NAMES,
    st.integers(0, 1 << 20), st.binary(max_size=32)), min_size=1, max_size=4),
    compression=st.tuples(st.sampled_from(_COMPRESSIONS), st.sampled_from(["all", "data.pkl", "byteorder", "data/"])))
def test_ckpt_zip_entries(entries, ops, compression):
    """Entry-level changes with correct CRCs: extra/missing/renamed/duplicate entries, odd byteorder
    entries (up to 1.2 MB, maybe compressed), storages shortened or grown, per-entry compression
    (stored, deflated, bzip2, lzma)."""
    items = list(entries.items())
    for op, name, n, blob in ops:
        i = n % len(items) if items else 0
        if op == "add":
            items.append((name, blob))
        elif op == "drop" and items:
            items.pop(i)
        elif op == "rename" and items:
            items[i] = (name, items[i][1])
        elif op == "dup" and items:
            items.append(items[i])
        elif op == "byteorder":
            folder = items[0][0].split("/")[0] if items else "archive"
            items = [it for it in items if it[0] != f"{folder}/byteorder"]  # replaced, not duplicated
            items.append((f"{folder}/byteorder",
                          [b"big", b"little", b"", b"little\n", blob, b"little" * (n % 200000)][n % 6]))
        elif op == "resize" and items:
            data = items[i][1]
            items[i] = (items[i][0], data[: n % (len(data) + 1)] if n % 2 else data + blob * (1 + n % 5))
        elif op == "swap" and len(items) > 1:
            j = (n // 7) % len(items)
            items[i], items[j] = (items[i][0], items[j][1]), (items[j][0], items[i][1])
    try:
        method, which = compression
        data = _zip_bytes(items, {k: method for k, _ in items if which == "all" or which in k})
    except (ValueError, UnicodeEncodeError):
        return  # zipfile refuses to write this name
    out = _run("ckpt_zip_entries", read_ckpt, _write("ze.ckpt", data))
    if out is not None:
        _check_tensors(out)


def _ops(data):
    """[(start, end, opcode name)] of a pickle."""
    ops, prev = [], None
    for op, arg, pos in pickletools.genops(data):
        if prev is not None:
            ops.append((prev[0], pos, prev[1]))
        prev = (pos, op.name)
    ops.append((prev[0], len(data), prev[1]))
    return ops


@_fuzz("ckpt_pickle_ops")
@given(entries=_valid_ckpt_entries(), choices=_CHOICES)
def test_ckpt_pickle_opcode_mutations(entries, choices):
    """data.pkl of a valid checkpoint edited opcode by opcode (CRC stays right, so the unpickler sees it):
    ints (sizes, strides, offsets, numels) and strings (keys) replaced, globals swapped for dangerous
    ones, opcodes dropped/duplicated/moved/replaced, payload calls and persistent ids inserted."""
    c = _Choices(choices)
    name = next(k for k in entries if k.endswith("/data.pkl"))
    data = entries[name]
    for _ in range(1 + c.below(5)):
        try:
            ops = _ops(data)
        except Exception:  # an earlier edit broke the opcode stream: keep it as it is
            break
        kind = c.pick(["int", "str", "global", "drop", "dup", "opcode", "junk", "flip", "payload", "pid", "move"])
        start, end, _ = c.pick(ops)
        if kind in ("int", "str", "global"):
            want = {"int": ("BININT1", "BININT", "BININT2", "LONG1"), "str": ("BINUNICODE",),
                    "global": ("GLOBAL",)}[kind]
            cands = [o for o in ops if o[2] in want]
            if not cands:
                continue
            start, end, _ = c.pick(cands)
            new = {"int": lambda: _p_int(c.integer()), "str": lambda: _p_str(c.text()),
                   "global": lambda: _g_global(c)}[kind]()
        elif kind == "drop":
            new = b""
        elif kind == "dup":
            new = data[start:end] * 2
        elif kind == "opcode":
            new = c.pick(_OPCODE_BYTES) + data[start + 1:end]
        elif kind == "junk":
            new = data[start:end] + c.pick(_OPCODE_BYTES) + c.blob(6)
        elif kind == "flip":
            i = start + c.below(end - start)
            new = data[start:i] + bytes([data[i] ^ (1 + c.below(255))]) + data[i + 1:end]
        elif kind == "payload":
            new = data[start:end] + _g_payload(c) + b"0"  # push a call's result, then POP it
        elif kind == "pid":
            new = data[start:end] + _g_pid(c) + b"Q0"
        else:  # move: this opcode elsewhere
            rest = data[:start] + data[end:]
            j = c.below(len(rest) + 1)
            data = rest[:j] + data[start:end] + rest[j:]
            continue
        data = data[:start] + new + data[end:]
        if not data:
            break
    entries = dict(entries, **{name: data})
    out = _run("ckpt_pickle_ops", read_ckpt, _write("po.ckpt", _zip_bytes(entries)))
    if out is not None:
        _check_tensors(out)


@_fuzz("ckpt_pickle_grammar")
@given(choices=_CHOICES)
def test_ckpt_pickle_grammar(choices):
    """data.pkl generated from a grammar of opcodes (see module docstring), next to real storages."""
    c = _Choices(choices)
    reader = c.pick([read_ckpt, read_ckpt, load_ckpt])
    pkl = _g_pickle(c)
    entries = {"archive/data.pkl": pkl, **_grammar_storage_entries()}
    out = _run("ckpt_pickle_grammar", reader, _write("pg.ckpt", _zip_bytes(entries)))
    if out is not None and reader is read_ckpt:
        _check_tensors(out)
        for key in _GRAMMAR_STORAGES:
            if f"ok{key}" in out:
                assert out[f"ok{key}"].shape == (2,)


def _dag(depth, use):
    """An object of 2**depth leaves built from a few hundred bytes with memo GETs (a tuple DAG, or a
    list DAG for use="list"), then used where a naive reader would hash, repr or walk all of it."""
    node = (lambda get: b"](" + get + get + b"e") if use == "list" else (lambda get: get + get + b"\x86")
    pre = (b"]" if use == "list" else _p_str("x")) + b"\x94"                     # memo 0: the leaf
    for i in range(depth):
        pre += node(b"j" + struct.pack("<I", i)) + b"\x94"                       # LONG_BINGET i twice, MEMOIZE
    pre += b"0" * (depth + 1)                                                     # clear the stack
    top = b"j" + struct.pack("<I", depth)
    body = {
        "key": b"}(" + top + _p_str("v") + b"u",                                  # dict key: hashed
        "list": b"}(" + _p_str("v") + top + b"u",                                 # value: load_ckpt walks it
        "set": b"\x8f(" + top + b"\x90",                                         # set item: hashed
        "pid": _p_str("storage") + top + b"\x86Q",                               # refused persistent id
        "geometry": _p_dict([(_p_str("w"), _p_reduce(_p_global("torch._utils", "_rebuild_tensor_v2"), [
            _valid_pid("0") + b"Q", _p_int(0), top, top, b"\x89", b"N"]))]),    # refused tensor size
    }[use]
    return _p_wrap(pre + body, 4)


@_fuzz("ckpt_memo_dag")
@given(depth=st.integers(1, 80), use=st.sampled_from(["key", "list", "set", "pid", "geometry"]),
       reader=st.sampled_from([read_ckpt, load_ckpt]))
@example(depth=64, use="key", reader=read_ckpt)
@example(depth=64, use="list", reader=load_ckpt)
@example(depth=64, use="pid", reader=read_ckpt)
def test_ckpt_memo_dag(depth, use, reader):
    """Objects of 2**depth nodes from a few hundred bytes (memo GETs): hashing, repr-ing or walking
    them naively takes forever, so the reader must bound the work (deadline)."""
    entries = {"archive/data.pkl": _dag(depth, use), **_grammar_storage_entries()}
    _run("ckpt_memo_dag", reader, _write("dag.ckpt", _zip_bytes(entries)))


_STORAGE_DTYPES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
                   "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
                   "ByteStorage": "u1", "BoolStorage": "u1"}
_DIM = st.one_of(st.integers(0, 6), st.sampled_from([2 ** 12, 2 ** 24, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1,
                                                     2 ** 63, 2 ** 64, 2 ** 100, -1, -2 ** 63]))


@st.composite
def _geometries(draw):
    if draw(st.booleans()):  # plausible: small, often inside the storage (the oracle then runs)
        ndim = draw(st.integers(0, 3))
        return (draw(st.integers(0, 8)), draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)),
                draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    ndim = draw(st.one_of(st.integers(0, 4), st.integers(30, 70)))
    if ndim > 4:
        size = [draw(st.sampled_from([1, 1, 1, 0, 2])) for _ in range(ndim)]
    else:
        size = draw(st.lists(_DIM, min_size=ndim, max_size=ndim))
    stride = draw(st.one_of(st.lists(_DIM, min_size=len(size), max_size=len(size)),
                            st.lists(_DIM, max_size=5)))
    return draw(_DIM), size, stride


@_fuzz("ckpt_tensor_geometry")
@given(stype=st.sampled_from(sorted(_STORAGE_DTYPES)), numel=st.integers(0, 40), declared=st.none() | _DIM | st.integers(0, 48),
       geometry=_geometries(), compression=st.sampled_from([zipfile.ZIP_STORED] * 3 + [zipfile.ZIP_DEFLATED]),
       param=st.booleans())
@example(stype="FloatStorage", numel=4, declared=4, geometry=(0, [2 ** 40], [0]), compression=0, param=False)
@example(stype="FloatStorage", numel=4, declared=4, geometry=(0, [2 ** 32, 2 ** 32], [0, 0]), compression=0,
         param=False)
@example(stype="DoubleStorage", numel=4, declared=4, geometry=(0, [1], [2 ** 62]), compression=0, param=False)
@example(stype="FloatStorage", numel=4, declared=4, geometry=(0, [0, 2 ** 63], [1, 1]), compression=0, param=False)
@example(stype="ByteStorage", numel=4, declared=2 ** 64, geometry=(0, [4], [1]), compression=8, param=False)
def test_ckpt_tensor_geometry(stype, numel, declared, geometry, compression, param):
    """One storage, one tensor with hostile rebuild args (negative/huge offsets, sizes and strides, stride 0,
    products past int64, 30-70 dimensions) and a declared numel that may disagree with the entry's bytes.
    When accepted, the values must equal an element-by-element oracle (no out-of-bounds reads)."""
    offset, size, stride = geometry
    declared = numel if declared is None else declared
    itemsize = np.dtype(_STORAGE_DTYPES[stype]).itemsize
    raw = np.random.default_rng(numel).integers(0, 256, numel * itemsize, np.uint8).tobytes()
    pid = ("storage", Global("torch", stype), "0", "cpu", declared)
    node = Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                  (Persistent(pid), offset, tuple(size), tuple(stride), False, None))
    if param:
        node = Reduce(Global("torch._utils", "_rebuild_parameter"), (node, False, None))
    entries = {"archive/data.pkl": pickle_bytes({"w": node}), "archive/data/0": raw, "archive/version": b"3\n"}
    out = _run("ckpt_tensor_geometry", read_ckpt, _write("geo.ckpt", _zip_bytes(entries, compression)))
    if out is None:
        return
    _check_tensors(out)
    got = out["w"]
    assert got.shape == tuple(size)
    count = int(np.prod(size, dtype=object))
    assert 0 <= declared <= numel
    if count > 4096:
        return
    flat = np.frombuffer(raw, _STORAGE_DTYPES[stype])
    want = np.empty(count, flat.dtype)
    for j, idx in enumerate(np.ndindex(*size) if size else [()]):
        e = offset + sum(i * s for i, s in zip(idx, stride))
        assert 0 <= e < declared
        want[j] = flat[e]
    want = want.reshape(size)
    if stype == "BFloat16Storage":
        want = (want.astype(np.uint32) << 16).view(np.float32)
    elif stype == "BoolStorage":
        want = want != 0
    np.testing.assert_array_equal(got, want.astype(want.dtype.newbyteorder("=")))


@_fuzz("ckpt_random_bytes")
@given(prefix=st.sampled_from([b"PK\x03\x04", b"PK\x03\x04\x14\x00\x00\x00\x00\x00", b"\x80\x02", b"\x80\x04\x95",
                               b"PK\x05\x06", b""]),
       body=st.binary(max_size=4096), tail=st.sampled_from([b"", b"PK\x05\x06" + b"\x00" * 18,
                                                            b"PK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00"]),
       ext=st.sampled_from([".ckpt", ".pt", ".pth", ".bin"]))
def test_ckpt_random_bytes(prefix, body, tail, ext):
    """Random bytes behind a zip (or pickle) magic, maybe with an end-of-central-directory record."""
    out = _run("ckpt_random_bytes", read_checkpoint, _write("rb" + ext, prefix + body + tail))
    if out is not None:
        _check_tensors(out)


def test_payloads_really_run_under_plain_pickle():
    """Control: each grammar payload creates the marker when unpickled by plain pickle, so its absence
    in the fuzz tests means something."""
    marker = os.path.join(_DIR, "control")
    for (mod, name, args), style in [(p, s) for p in _payloads(marker) for s in ("GLOBAL", "STACK_GLOBAL")]:
        pickle.loads(_p_wrap(_p_payload((mod, name, args), style), 2))  # 2: __builtin__ maps to builtins
        assert os.path.exists(marker), (mod, name, style)
        (os.rmdir if os.path.isdir(marker) else os.remove)(marker)


# ============================================================================= .safetensors tests
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}


def _check_st(test, path):
    """Both entry points agree; accepted arrays match the header."""
    meta = _run(test + "/meta", read_safetensors_metadata, path)
    out = _run(test, read_safetensors, path)
    assert (meta is None) == (out is None), "read_safetensors and read_safetensors_metadata disagree"
    if out is None:
        return
    _check_tensors(out)
    assert list(out) == list(meta)
    for k, v in out.items():
        want_dtype = np.float32 if meta[k]["dtype"] == "BF16" else bool if meta[k]["dtype"] == "BOOL" else \
            np.dtype(_ST_DTYPES[meta[k]["dtype"]]).newbyteorder("=")
        assert v.shape == meta[k]["shape"] and v.dtype == want_dtype, k


@st.composite
def _valid_safetensors(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                          max_size=4, unique=True))
    header, data = {}, b""
    for name in names:
        dtype = draw(st.sampled_from(sorted(_ST_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        raw = draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize,
                             max_size=int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if draw(st.booleans()):
        header = {"__metadata__": draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
                  **header}
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    text += " " * draw(st.sampled_from([0, -len(text.encode()) % 8, 3]))
    return text.encode("utf-8", "surrogatepass"), data


_NUM_TEXT = st.sampled_from([b"-1", b"0", b"1", b"7", b"18446744073709551616", b"9223372036854775808",
                             b"1e400", b"1.5", b"true", b"null", b"\"1\"", b"[]", b"-0", b"1" * 5000, b"NaN"])


@_fuzz("st_bytes")
@given(valid=_valid_safetensors(), header_mut=st.lists(st.tuples(st.sampled_from(["num", "dtype", "byte"]),
                                                                  st.integers(0, 10 ** 6), _NUM_TEXT,
                                                                  st.sampled_from(sorted(_ST_DTYPES) + ["C64", "F8_E4M3", "f32", ""]),
                                                                  st.binary(min_size=1, max_size=3)),
                                                        max_size=3),
       fix_length=st.booleans(), mutations=st.lists(st.tuples(
           st.sampled_from(["flip", "set", "insert", "delete", "truncate", "u16", "u32", "u64", "dup"]),
           st.integers(0, 64), st.floats(0, 1), st.integers(0, 1 << 16), st.binary(max_size=16)), max_size=3))
def test_safetensors_byte_mutations(valid, header_mut, fix_length, mutations):
    """Valid files whose header numbers/dtypes/bytes are replaced (length field fixed up or not), then
    bytes flipped/inserted/deleted/overwritten in the length field, header or buffer."""
    header, data = valid
    for kind, n, num, dtype, blob in header_mut:
        if kind == "num":
            spots = list(re.finditer(rb"-?\d+", header))
            if spots:
                m = spots[n % len(spots)]
                header = header[:m.start()] + num + header[m.end():]
        elif kind == "dtype":
            spots = list(re.finditer(rb'"(%s)"' % b"|".join(d.encode() for d in _ST_DTYPES), header))
            if spots:
                m = spots[n % len(spots)]
                header = header[:m.start(1)] + dtype.encode() + header[m.end(1):]
        else:
            i = n % (len(header) + 1)
            header = header[:i] + blob + header[i + 1:]
    if not fix_length and header_mut:
        length = len(valid[0])
    else:
        length = len(header)
    blob = struct.pack("<Q", length) + header + data
    regions = [(0, 8), (8, 8 + len(header)), (8 + len(header), len(blob))]
    if mutations:
        blob = _apply(blob, regions, mutations, extra_ints=[len(blob), len(blob) - 8, MAX_HEADER_BYTES,
                                                            MAX_HEADER_BYTES + 1])
    _check_st("st_bytes", _write("sb.safetensors", blob))


def _g_json(c, depth=0):
    """A JSON value: scalars of every kind (huge ints, NaN, Infinity, odd strings) or nested junk."""
    k = c.below(8 if depth < 3 else 6)
    if k == 0:
        return None
    if k == 1:
        return c.flag()
    if k == 2:
        return c.integer()
    if k == 3:
        return c.pick([0.5, -1.0, 1e300, float("inf"), float("nan"), -0.0, 4.0])
    if k in (4, 5):
        return c.text(6)
    if k == 6:
        return [_g_json(c, depth + 1) for _ in range(c.below(4))]
    return {c.text(4): _g_json(c, depth + 1) for _ in range(c.below(4))}


def _g_shape(c):
    return c.pick([
        lambda: [c.below(5) for _ in range(c.below(4))],
        lambda: [c.integer() for _ in range(c.below(5))],
        lambda: [c.pick([0, 2 ** 62, 2 ** 63, 2 ** 64, 2 ** 100]) for _ in range(2 + c.below(2))],
        lambda: [1] * (30 + c.below(41)),
        lambda: _g_json(c),
    ])()


def _g_header(c):
    """(header bytes, buffer bytes, length field): entries coherent or not, maybe duplicate names."""
    pairs, pos = [], 0
    for _ in range(c.below(6)):
        name = c.pick(["a", "b", "__metadata__", ""]) if c.flag() else c.text(5)
        kind = c.pick(["coherent", "coherent", "random", "junk"])
        dtype = c.pick(sorted(_ST_DTYPES)) if c.below(3) else c.pick(["C64", "F8_E4M3", "bf16", "", "U64", 5, None,
                                                                     ["F32"], {"F32": 1}])
        shape = _g_shape(c) if c.flag(3) else [c.below(5) for _ in range(c.below(4))]
        if kind == "coherent" and isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list) and \
                all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 20 for d in shape):
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[dtype]).itemsize
            begin = pos + c.pick([0, 0, 0, -1, 1, -pos])
            offs = [begin, begin + nbytes + c.pick([0, 0, 0, 1, -1, 2 ** 64])]
            pos = offs[1]
        elif kind == "junk":
            offs = _g_json(c)
        else:
            offs = [c.integer() for _ in range(c.below(4))]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offs}
        if c.flag(4):
            field = c.pick(["dtype", "shape", "data_offsets", "extra"])
            if c.flag():
                entry.pop(field, None)
            else:
                entry[field] = _g_json(c)
        pairs.append((name, entry if c.below(10) else _g_json(c)))
    if pairs and c.flag():                                         # duplicate a name
        pairs.append(c.pick(pairs))
    if c.flag(5):
        pairs.insert(0, ("__metadata__", _g_json(c)))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    if c.flag(10):
        text = json.dumps(_g_json(c))                               # not an object at all
    header = text.encode("utf-8", "surrogatepass")
    datalen = max(0, pos + c.pick([0, 0, 0, 1, -1, -pos]))
    data = c.blob(datalen) if datalen < 4096 else b"\0" * min(datalen, 1 << 16)
    data = data + bytes(datalen - len(data)) if datalen < 4096 else data
    length = len(header) + c.pick([0, 0, 0, 0, 1, -1, 8, 2 ** 32, 2 ** 63])
    return header, data, max(length, 0) % (1 << 64)


@_fuzz("st_json_header")
@given(choices=_CHOICES)
def test_safetensors_json_headers(choices):
    """Headers from a generator of entries: wrong dtypes (unknown, non-strings), shapes with negative,
    huge, non-int or 30-70 dimensions, offsets overlapping/gapped/past the end/non-int, missing and extra
    fields, non-dict entries, duplicate names, junk __metadata__, wrong length fields."""
    header, data, length = _g_header(_Choices(choices))
    _check_st("st_json_header", _write("sj.safetensors", struct.pack("<Q", length) + header + data))


@_fuzz("st_random_bytes")
@given(length=st.one_of(st.integers(0, 5000), st.sampled_from([MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2 ** 63, 2 ** 64 - 1])),
       body=st.binary(max_size=4096), brace=st.booleans(), fit=st.booleans())
def test_safetensors_random_bytes(length, body, brace, fit):
    """A length prefix (often matching the data) followed by random bytes, often starting with '{'."""
    body = (b"{" if brace else b"") + body
    if fit:
        length = min(length, len(body))
    _check_st("st_random_bytes", _write("sr.safetensors", struct.pack("<Q", length) + body))


# ============================================================================= regressions
# What the fuzzers above found in the readers as first written (see docs/fuzzing.md), one file each,
# so the exact cases stay covered whatever the random draws.  (tmp_path: outside hypothesis.)
def _ckpt(tmp_path, pkl, compression=zipfile.ZIP_STORED, **extra_entries):
    entries = {"archive/data.pkl": pkl, **_grammar_storage_entries(), **extra_entries}
    path = tmp_path / "r.ckpt"
    path.write_bytes(_zip_bytes(entries, compression))
    return path


def _tensor_pkl(size, stride, pid=None, offset=0):
    return _p_wrap(_p_dict([(_p_str("w"), _p_reduce(_p_global("torch._utils", "_rebuild_tensor_v2"), [
        (pid or _valid_pid("0")) + b"Q", _p_int(offset), _p_tuple([_p_int(n) for n in size]),
        _p_tuple([_p_int(s) for s in stride]), b"\x89", b"N"]))]), 2)


@pytest.mark.parametrize("pkl, reader, message", [
    # MemoryError: BINBYTES8/BYTEARRAY8 declaring 1 TB (the C unpickler allocates before reading)
    (_p_wrap(b"\x8e" + struct.pack("<Q", 2 ** 40) + b"x", 4), read_ckpt, r"malformed archive/data.pkl"),
    (_p_wrap(b"\x96" + struct.pack("<Q", 2 ** 40) + b"x", 5), read_ckpt, r"malformed archive/data.pkl"),
    (_p_wrap(b"\x95" + struct.pack("<q", 2 ** 40) + b"}", 4), read_ckpt, r"no tensors found"),  # short FRAME: fine
    # RecursionError: 3000 nested lists walked by load_ckpt
    (_p_wrap(b"]" * 3000 + b"a" * 2999, 2), load_ckpt, r"nested more than 100 deep at '\[0\]\[0\]"),
    # ValueError/OverflowError from numpy: 70 dimensions, empty tensors too big for numpy
    (_tensor_pkl([1] * 70, [1] * 70), read_ckpt, r"has 70 dimensions; at most 32"),
    (_tensor_pkl([0, 2 ** 63 - 1], [1, 1]), read_ckpt, r"tensor 'w': size \(0, 9223372036854775807\) is too large"),
    (_tensor_pkl([2], [2 ** 63]), read_ckpt, r"stride \(9223372036854775808,\) must be a tuple of non-negative int64s"),
    # ValueError from int -> str (over 4300 digits) while formatting an error message
    (_tensor_pkl([10 ** 5000], [1]), read_ckpt, r"size \(<16610-bit int>,\) must be"),
    # hangs: a key of 2**64 tuple nodes from 400 bytes; a growing name for repeated calls
    (_dag(64, "key"), read_ckpt, r"too large to hash"),
    (_dag(64, "pid"), read_ckpt, r"unsupported persistent id \('storage', \(\(\(\(\.\.\.\), \(\.\.\.\)\)"),
    # quadratic dicts: 4100 float keys (their hashes can be chosen to collide)
    (_p_wrap(b"}(" + b"".join(b"G" + struct.pack(">d", i + 0.5) + b"N" for i in range(4100)) + b"u", 2),
     read_ckpt, r"more than 4096 dict keys/set items with attacker-chosen hashes"),
    (_p_wrap(b"p99999999999999999999\n", 0), read_ckpt, r"PUT memo index 99999999999999999999 out of range"),
], ids=["binbytes8", "bytearray8", "frame", "nested-lists", "70-dims", "empty-too-big", "stride-int64",
        "5000-digit-size", "dag-key", "dag-pid", "float-keys", "put-index"])
def test_found_by_fuzzing_ckpt(tmp_path, pkl, reader, message):
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"r\.ckpt: .*{message}"):
        reader(_ckpt(tmp_path, pkl))
    assert time.perf_counter() - t0 < 5


def test_found_by_fuzzing_zero_dim_tensors_are_arrays(tmp_path):
    """bfloat16 and bool 0-d tensors came back as numpy scalars (a ufunc on a 0-d array)."""
    bits = TorchTensor(np.array([0x3FC0], np.uint16), 0, (), bfloat16=True)
    flag = TorchTensor(np.array([True]), 0, ())
    path = tmp_path / "z.ckpt"
    path.write_bytes(_zip_bytes(torch_zip_entries({"b": bits, "f": flag})))
    got = read_ckpt(path)
    assert type(got["b"]) is np.ndarray and got["b"].shape == () and got["b"] == 1.5
    assert type(got["f"]) is np.ndarray and got["f"].dtype == bool and got["f"]
    header = {"b": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]},
              "f": {"dtype": "BOOL", "shape": [], "data_offsets": [2, 3]}}
    text = json.dumps(header).encode()
    st_path = tmp_path / "z.safetensors"
    st_path.write_bytes(struct.pack("<Q", len(text)) + text + struct.pack("<H", 0x3FC0) + b"\x01")
    got = read_safetensors(st_path)
    assert type(got["b"]) is np.ndarray and got["b"].shape == () and got["b"] == 1.5
    assert type(got["f"]) is np.ndarray and got["f"].dtype == bool


def test_found_by_fuzzing_zip_entries(tmp_path):
    """zipfile errors (bad local header, corrupt deflate stream) escaped from entry reads; other
    compression methods and impossible deflate ratios are refused before decompressing."""
    entries = torch_zip_entries({"w": np.ones(2, np.float32)})
    data = _zip_bytes(entries)
    z = zipfile.ZipFile(io.BytesIO(data))
    h = z.getinfo("archive/byteorder").header_offset
    path = tmp_path / "r.ckpt"
    path.write_bytes(data[:h] + b"XX" + data[h + 2:])  # byteorder's local header magic broken
    with pytest.raises(CheckpointError, match=r"cannot read zip entry 'archive/byteorder': BadZipFile"):
        read_ckpt(path)

    data = _zip_bytes(entries, zipfile.ZIP_DEFLATED)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("archive/data.pkl")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    path.write_bytes(data[:start] + b"\xff" * 4 + data[start + 4:])  # corrupt deflate stream
    with pytest.raises(CheckpointError, match=r"cannot read zip entry 'archive/data.pkl': (error|BadZipFile)"):
        read_ckpt(path)

    data = _zip_bytes(entries)  # long run: a central record needing zip version 12.7 -> NotImplementedError
    cd = zipfile.ZipFile(io.BytesIO(data)).start_dir
    path.write_bytes(data[:cd + 6] + struct.pack("<H", 127) + data[cd + 8:])
    with pytest.raises(CheckpointError, match=r"bad zip: NotImplementedError: zip file version 12.7"):
        read_ckpt(path)

    path.write_bytes(_zip_bytes(entries, {"archive/data.pkl": zipfile.ZIP_LZMA}))
    with pytest.raises(CheckpointError, match=r"'archive/data.pkl' uses compression method 14; only stored or deflated"):
        read_ckpt(path)

    data = _zip_bytes(entries, zipfile.ZIP_DEFLATED)
    cd = data.index(b"PK\x01\x02" + data[data.index(b"PK\x01\x02") + 4:][:0])  # first central record
    while data[cd + 46:cd + 46 + struct.unpack("<H", data[cd + 28:cd + 30])[0]] != b"archive/data/0":
        cd = data.index(b"PK\x01\x02", cd + 4)
    path.write_bytes(data[:cd + 24] + struct.pack("<I", 2 ** 31) + data[cd + 28:])  # claims 2 GB uncompressed
    with pytest.raises(CheckpointError, match=r"'archive/data/0' claims 2147483648 bytes from \d+ compressed "
                                              r"bytes, more than deflate can produce"):
        read_ckpt(path)


@pytest.mark.parametrize("header, message", [
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, r"unsupported dtype \['F32'\]"),
    ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, r"unsupported dtype \{'F32': 1\}"),
    ({"a": {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]}}, r"shape \[0, 4611686018427387904\] is too large"),
    ({"a": {"dtype": "F32", "shape": [1] * 70, "data_offsets": [0, 4]}}, r"shape has 70 dimensions; at most 32"),
])
def test_found_by_fuzzing_safetensors(tmp_path, header, message):
    text = json.dumps(header).encode()
    path = tmp_path / "r.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    for reader in (read_safetensors, read_safetensors_metadata):
        with pytest.raises(CheckpointError, match=rf"r\.safetensors: tensor 'a': {message}"):
            reader(path)


def _negative_offset_zip(numel=4):
    """A stored checkpoint whose storage entry's local-header offset resolves to -50: the central
    directory's offset field is raised by D (zipfile then subtracts D from every entry's offset; the
    other entries get D added back) and a fake local header for the storage sits in the zip comment,
    so the header checks pass and the data would start 6 bytes before the end of the file."""
    entries = torch_zip_entries({"w": np.arange(numel, dtype=np.float32)})
    name = b"archive/data/0"
    fake = b"PK\x03\x04" + b"\0" * 22 + struct.pack("<HH", len(name), 0) + name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in entries.items():
            z.writestr(zipfile.ZipInfo(n, (1980, 1, 1, 0, 0, 0)), data)
        z.comment = fake + b"\0" * 6
    data = bytearray(buf.getvalue())
    eocd = len(data) - 22 - len(z.comment)
    size_cd, offset_cd = struct.unpack("<II", data[eocd + 12:eocd + 20])
    shift = 1 << 20
    data[eocd + 16:eocd + 20] = struct.pack("<I", offset_cd + shift)
    pos = offset_cd
    while pos < offset_cd + size_cd:
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        fname = bytes(data[pos + 46:pos + 46 + n])
        (off,) = struct.unpack("<I", data[pos + 42:pos + 46])
        data[pos + 42:pos + 46] = struct.pack("<I", shift - 50 if fname == name else off + shift)
        pos += 46 + n + m + k
    return bytes(data)


def test_found_in_review_negative_local_header_offset(tmp_path):
    """zipfile (3.11) lets a crafted central directory give an entry a negative offset; the memory-mapped
    path then sliced the map with it and handed a too-short buffer to as_strided: reads past the data."""
    path = tmp_path / "neg.ckpt"
    path.write_bytes(_negative_offset_zip())
    assert zipfile.ZipFile(path).getinfo("archive/data/0").header_offset == -50
    with pytest.raises(CheckpointError, match=r"neg\.ckpt: bad local header for zip entry 'archive/data/0'"):
        read_ckpt(path)
