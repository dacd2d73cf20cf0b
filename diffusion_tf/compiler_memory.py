"""Give the memory that graph tracing and XLA compilation freed back to the operating system.

Compiling the SD 1.5 generation allocates and frees over a GiB in many small blocks.
glibc keeps freed blocks in its heaps (one per thread that allocated, and the compiler runs
on several threads), so the process kept them through the whole first generation, whose
large buffers come from fresh mappings: 0.65 GiB of the peak resident memory of a 512x512
generation was such free heap (`malloc_trim(0)` after the first call released it). While a
new function compiles and first runs, a thread calls `malloc_trim(0)` every `interval`
seconds, and once more at the end. No effect (and no cost) where the C library has no
`malloc_trim` (macOS, Windows, musl).
"""

import contextlib
import ctypes
import ctypes.util
import sys
import threading


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _find_malloc_trim()


@contextlib.contextmanager
def released(active=True, interval=0.5):
    """While active, return freed heap memory to the OS every `interval` seconds and on exit."""
    trim = MALLOC_TRIM
    if not active or trim is None:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            trim(0)

    thread = threading.Thread(target=loop, name="diffusion_tf-malloc-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        trim(0)
