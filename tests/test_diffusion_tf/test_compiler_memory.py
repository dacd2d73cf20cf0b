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
