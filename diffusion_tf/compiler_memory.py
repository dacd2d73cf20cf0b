"""Give the memory that graph tracing and XLA compilation freed back to the operating system.

Compiling the SD 1.5 generation allocates and frees over a GiB in many small blocks.
glibc keeps freed blocks in its heaps (one per thread that allocated, and the compiler runs
on several threads), so the process kept them through the whole first generation, whose
large buffers come from fresh mappings: 0.65 GiB of the peak resident memory of a 512x512
generation was such free heap (`malloc_trim(0)` after the first call released it). While a
new function compiles and first runs, a thread checks every `interval` seconds how much free
heap there is (`mallinfo2`) and calls `malloc_trim(0)` when it is at least `min_free`
bytes, and calls it once more at the end. Trimming has a cost: the pages it gives back are
faulted in again when the compiler allocates anew (trimming every 0.5 s unconditionally made
the first call of the tiny test pipeline about 9% slower, 20.9 against 19.1 s over five
alternating runs), so small heaps are left alone. No effect (and no cost) where the C
library has no `malloc_trim` (macOS, Windows, musl); without `mallinfo2` (glibc < 2.33) it
trims on every tick.
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
