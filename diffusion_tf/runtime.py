"""The runtime options of diffusion_tf, read from the environment once per process.

    DIFFUSION_TF_WINOGRAD=0    direct 3x3 convolutions everywhere (default: Winograd where the
                               shape rule of `layers/conv2d.py` picks it)
    DIFFUSION_TF_KEEP_HEAP=0   glibc's heap defaults (default: keep large freed blocks, see
                               `compiler_memory.py`; it also selects the Winograd rule's bound)
    DIFFUSION_TF_HOME=DIR      the weights cache (default: ~/.cache/diffusion_tf)

`options()` is the frozen `Options` of this process: the environment as it was at the first
call. Every reader asks it, never `os.environ`, so that a traced graph and the cache folder
do not change with the environment half way through a process. Tests and benchmarks
override it explicitly:

    with runtime.overridden(winograd=False):   # restored on exit
        ...
    runtime.configure(home="/data/weights")    # for the rest of the process

A function traced under one option keeps the path it was traced with; set options before
the first call of what they govern.

`apply()` puts the process-wide heap setting into effect (once; see `compiler_memory`). It is
called where networks are made ready for use (`components.load_folder`, after the weights are
loaded), never from inside a network.

Importing this module imports neither TensorFlow nor Keras.
"""

import contextlib
import dataclasses
import os

from diffusion_tf import compiler_memory

__all__ = ["Options", "apply", "configure", "from_environ", "options", "overridden"]


@dataclasses.dataclass(frozen=True)
class Options:
    """winograd: Winograd 3x3 convolutions where the shape rule picks them.
    keep_heap: keep large freed heap blocks (and the Winograd bound measured with them).
    home: the weights cache folder as given (None: ~/.cache/diffusion_tf)."""

    winograd: bool = True
    keep_heap: bool = True
    home: "str | None" = None

    def __post_init__(self):
        for name in ("winograd", "keep_heap"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; must be True or False.")
        if self.home is not None:
            if not isinstance(self.home, (str, os.PathLike)) or not os.fspath(self.home):
                raise ValueError(f"home={self.home!r}; must be a non-empty folder path or None (the default cache).")
            object.__setattr__(self, "home", os.fspath(self.home))


def from_environ(environ=None):
    """The Options that `environ` (default os.environ) describes: a flag is off only when its
    variable is "0"; an empty DIFFUSION_TF_HOME means the default cache."""
    env = os.environ if environ is None else environ
    return Options(
        winograd=env.get("DIFFUSION_TF_WINOGRAD", "1") != "0",
        keep_heap=env.get("DIFFUSION_TF_KEEP_HEAP", "1") != "0",
        home=env.get("DIFFUSION_TF_HOME") or None,
    )


_current = None


def options():
    """This process's Options: read from the environment at the first call, then fixed
    (unless `configure` or `overridden` replaces them)."""
    global _current
    if _current is None:
        _current = from_environ()
    return _current


def configure(**changes):
    """Replace some options for the rest of the process; returns the new Options.
    ValueError naming an unknown option or a bad value."""
    global _current
    allowed = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"unknown runtime option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}.")
    _current = dataclasses.replace(options(), **changes)
    return _current


@contextlib.contextmanager
def overridden(**changes):
    """`configure(**changes)` inside the block, the previous Options again after it."""
    previous = options()
    try:
        yield configure(**changes)
    finally:
        global _current
        _current = previous


def apply():
    """Put the heap option into effect for this process: with keep_heap, glibc keeps large
    freed blocks (`compiler_memory.keep_large_blocks`; once per process, it cannot be undone).
    Returns whether large blocks are kept."""
    if options().keep_heap:
        return compiler_memory.keep_large_blocks()
    return compiler_memory.large_blocks_kept()
