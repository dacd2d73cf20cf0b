"""glibc heap settings for XLA on CPU: keep large blocks between calls, and give the memory
that graph tracing and XLA compilation freed back to the operating system.

Keeping large blocks (`keep_large_blocks`). glibc serves every allocation above its mmap
threshold (at most 32 MiB by default) from a fresh mapping and unmaps it on free, and gives
the top of its heap back above the trim threshold. An XLA call allocates its large
temporaries anew on each call, so each call faulted them in again (tens of thousands of page
faults per 512 px UNet step). `keep_large_blocks` raises both thresholds to `KEEP_BYTES`, so
freed blocks stay in the heap and the next call reuses them without a fault. It also makes
the Winograd filter transform cheap enough that more convolutions pay by Winograd (the wider
bound of `layers/conv2d.py`, chosen by the same runtime option). It is set once per process,
by `runtime.apply()`, where networks are ready for use: after their weights are loaded, so
that the blocks freed while loading are not kept resident. On by default;
`DIFFUSION_TF_KEEP_HEAP=0` (`runtime.Options.keep_heap`) turns it off. Peak memory of a whole
generation is about the same either way (benchmarks/README.md, "Default: large heap blocks
kept").

Giving back (`released`). Compiling a generation allocates and frees over a GiB in many small
blocks. glibc keeps freed blocks in its heaps (one per thread that allocated, and the compiler
runs on several threads), so the process kept them through the whole first generation, whose
large buffers come from fresh mappings, and they added to its peak resident memory. While a
new function compiles and first runs, a thread checks every `interval` seconds how much free
heap there is (`mallinfo2`) and calls `malloc_trim(0)` when it is at least `min_free`
bytes, and calls it once more at the end. Trimming has a cost: the pages it gives back are
faulted in again when the compiler allocates anew (trimming unconditionally made a first call
measurably slower), so small heaps are left alone. No effect (and no cost) where the C
library has no `malloc_trim` (macOS, Windows, musl); without `mallinfo2` (glibc < 2.33) it
trims on every tick. Measurements: benchmarks/README.md, "Figures behind the code's rules".
"""

import contextlib
import ctypes
import ctypes.util
import sys
import threading


def _libc_function(name, argtypes, restype):
    """The C library's function `name` with its signature set, or None (not Linux, or no
    such function in this C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _find_malloc_trim():
    return _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _find_free_bytes():
    """A function returning the bytes in glibc's free heap chunks (mallinfo2, glibc >= 2.33),
    or None."""
    info = _libc_function("mallinfo2", [], _MallInfo2)
    return None if info is None else (lambda: info().fordblks)


MALLOC_TRIM = _find_malloc_trim()
FREE_BYTES = _find_free_bytes()
MIN_FREE = 256 * 2**20

MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_BYTES = 2**30
_kept = None


def keep_large_blocks():
    """Keep freed blocks up to KEEP_BYTES in glibc's heap instead of unmapping them (see the
    module docstring); once per process (call `runtime.apply()`, which honours the keep_heap
    option). Returns whether the setting is in effect: False where the C library has no glibc
    `mallopt`."""
    global _kept
    if _kept is None:
        _kept = False
        if MALLOPT is not None:
            # The mmap threshold first: where it is refused, nothing has changed (setting the
            # trim threshold alone would turn off glibc's own adaptation of both).
            _kept = MALLOPT(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and MALLOPT(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    return _kept


def large_blocks_kept():
    """Whether `keep_large_blocks` is in effect in this process (without setting it)."""
    return bool(_kept)


@contextlib.contextmanager
def released(active=True, interval=0.5, min_free=MIN_FREE):
    """While active, return freed heap memory to the OS every `interval` seconds when at
    least `min_free` bytes of it are free, and on exit."""
    trim, free_bytes = MALLOC_TRIM, FREE_BYTES
    if not active or trim is None:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            if free_bytes is None or free_bytes() >= min_free:
                trim(0)

    thread = threading.Thread(target=loop, name="diffusion_tf-malloc-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        trim(0)
