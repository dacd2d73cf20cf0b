"""compiler_memory: freed heap is given back while a function compiles, and only then."""

import sys
import threading
import time

import pytest

from diffusion_tf import compiler_memory


def counting(monkeypatch):
    calls = []
    monkeypatch.setattr(compiler_memory, "MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(compiler_memory, "FREE_BYTES", lambda: compiler_memory.MIN_FREE)
    return calls


def test_released_trims_periodically_and_at_the_end(monkeypatch):
    calls = counting(monkeypatch)
    before = threading.active_count()
    with compiler_memory.released(interval=0.01):
        time.sleep(0.2)
    assert len(calls) >= 3 and set(calls) == {0}  # several periodic calls, then the final one
    assert threading.active_count() == before  # the thread stopped
    n = len(calls)
    with pytest.raises(RuntimeError):
        with compiler_memory.released(interval=10):
            raise RuntimeError("boom")
    assert len(calls) == n + 1  # trimmed on the way out of an exception too


def test_small_free_heap_is_trimmed_only_at_the_end(monkeypatch):
    calls = counting(monkeypatch)
    monkeypatch.setattr(compiler_memory, "FREE_BYTES", lambda: compiler_memory.MIN_FREE - 1)
    with compiler_memory.released(interval=0.01):
        time.sleep(0.1)
    assert calls == [0]
    monkeypatch.setattr(compiler_memory, "FREE_BYTES", None)  # no mallinfo2: trims on every tick
    with compiler_memory.released(interval=0.01):
        time.sleep(0.1)
    assert len(calls) >= 3


def test_inactive_or_unavailable_does_nothing(monkeypatch):
    calls = counting(monkeypatch)
    with compiler_memory.released(active=False, interval=0.01):
        time.sleep(0.05)
    assert calls == []
    monkeypatch.setattr(compiler_memory, "MALLOC_TRIM", None)
    with compiler_memory.released(interval=0.01):
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_malloc_trim_and_mallinfo2_are_found_on_linux():
    assert compiler_memory._find_malloc_trim() is not None
    free_bytes = compiler_memory._find_free_bytes()
    if free_bytes is not None:  # glibc >= 2.33
        blocks = [bytearray(1 << 16) for _ in range(512)]  # 32 MiB of heap, then freed
        del blocks
        assert isinstance(free_bytes(), int) and free_bytes() >= 0


@pytest.mark.heavy  # a fresh pipeline traced three ways; CI's second step
def test_text2image_trims_on_a_functions_first_call_only(monkeypatch):
    from support import tiny_models

    from diffusion_tf import Text2Image

    calls = counting(monkeypatch)
    pipe = Text2Image(model=tiny_models.converted_folder("tiny-sd1"), img_height=64, img_width=64)
    pipe.generate("a cat", num_steps=2, seed=0)
    assert calls, "the first call (tracing) did not trim"
    n = len(calls)
    pipe.generate("a dog", num_steps=2, seed=1)
    assert len(calls) == n  # compiled already: no trimming thread
    pipe.generate("a dog", num_steps=2, seed=1, callback=lambda *a: None)
    assert len(calls) > n  # the callback path's step function is new


# Calls a tiny network, applies the runtime's heap setting, then allocates, fills and frees a
# 96 MiB block twice with the C library's malloc, and prints the page faults of the second
# round. Above glibc's default mmap threshold (32 MiB at most), the block is a fresh mapping
# each time: about 24,000 faults. Kept in the heap: about none.
FAULTS_SCRIPT = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from diffusion_tf import compiler_memory, runtime
from diffusion_tf.models import AutoencoderKL
vae = AutoencoderKL(block_out_channels=[8], layers_per_block=1, norm_num_groups=4, latent_channels=4)
vae.build_weights()
vae(np.zeros((1, 8, 8, 3), np.float32))
assert not compiler_memory.large_blocks_kept()  # calling a network changes no process state
applied = runtime.apply()
assert applied is compiler_memory.large_blocks_kept()
vae(np.zeros((1, 8, 8, 3), np.float32))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def round_trip(n=96 * 2**20):
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "kept": compiler_memory.large_blocks_kept()}))
"""


@pytest.mark.skipif(compiler_memory.MALLOPT is None, reason="glibc mallopt")
@pytest.mark.parametrize("env, kept", [(None, True), pytest.param("1", True, marks=pytest.mark.heavy),
                                       pytest.param("0", False, marks=pytest.mark.heavy)])
def test_applying_the_runtime_keeps_large_freed_blocks_in_the_heap(env, kept):
    import json
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    environ.pop("DIFFUSION_TF_KEEP_HEAP", None)
    if env is not None:
        environ["DIFFUSION_TF_KEEP_HEAP"] = env
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, root], capture_output=True, text=True,
                         env=environ, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] is kept
    pages = 96 * 2**20 // 4096
    if kept:
        assert result["faults"] < pages // 10, result  # reused without faulting in again
    else:
        assert result["faults"] > pages // 2, result  # glibc's default: a fresh mapping
