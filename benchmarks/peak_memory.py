"""Peak resident memory of this process, for the benchmarks' fresh-process measurements.

Not `resource.getrusage(RUSAGE_SELF).ru_maxrss` alone: on Linux a process started with
`subprocess` inherits its parent's high-water mark across exec (the kernel records the old
address space's peak at exec, and with vfork that space is the parent's), so a child of a
parent that had held 13 GiB reported 13 GiB whatever it used itself (speed.py, 2026-11-24).
`VmHWM` in /proc/self/status is the peak of the process's own address space.
"""

import re
import resource
import sys


def peak_rss_gib():
    """Peak resident memory of this process in GiB: VmHWM where /proc has it (Linux), else
    ru_maxrss (kilobytes on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 2**20
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**30 if sys.platform == "darwin" else maxrss / 2**20
