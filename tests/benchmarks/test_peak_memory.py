"""benchmarks/peak_memory.py: a child's peak is its own, not its parent's."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.peak_memory import peak_rss_gib  # noqa: E402

CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.peak_memory import peak_rss_gib; print(peak_rss_gib())"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_a_child_does_not_report_its_parents_peak():
    block = np.ones(2**29 // 8)  # 512 MiB, written so that it is resident
    parent = peak_rss_gib()
    child = float(subprocess.run([sys.executable, "-c", CHILD, ROOT], capture_output=True, text=True,
                                 check=True).stdout)
    assert parent >= 0.5, parent
    # ru_maxrss in the child would be at least the parent's peak (inherited across exec).
    assert child < 0.25, (child, parent)
    del block
