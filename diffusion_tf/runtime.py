"""The runtime options of diffusion_tf, read from the environment once per process.

    DIFFUSION_TF_WINOGRAD=0    direct 3x3 convolutions everywhere (default: Winograd where the
                               shape rule of `layers/conv2d.py` picks it)
    DIFFUSION_TF_KEEP_HEAP=0   glibc's heap defaults (default: keep large freed blocks, see
                               `compiler_memory.py`; it also selects the Winograd rule's bound)
    DIFFUSION_TF_HOME=DIR      the weights cache (default: ~/.cache/diffusion_tf)
    DIFFUSION_TF_COMPILE_CACHE=1   keep compiled XLA functions on disk, in
                               <home>/xla-cache/tf-<version>-<cpu>, so that another process
                               with the same settings does not compile again (default: off)
    TF_ENABLE_ONEDNN_OPTS=1    TensorFlow's own variable: its oneDNN kernels and their pooling
                               allocator (default here: 0, see `default_tensorflow_environ`)

`options()` is the frozen `Options` of this process: the environment as it was at the first
call. Every reader asks it, never `os.environ`, so that a traced graph and the cache folder
do not change with the environment half way through a process. Tests and benchmarks
override it explicitly:

    with runtime.overridden(winograd=False):   # restored on exit
        ...
    runtime.configure(home="/data/weights")    # for the rest of the process

A function traced under one option keeps the path it was traced with; set options before
the first call of what they govern.

`apply()` puts the process-wide heap setting into effect (once; see `compiler_memory`) and
points XLA's persistent compilation cache at its folder. It is called where networks are made
ready for use (`components.load_folder`, after the weights are loaded), never from inside a
network. The cache is TensorFlow's own (`--tf_xla_persistent_cache_directory` of TF_XLA_FLAGS:
serialized XLA:CPU/GPU executables keyed by the fingerprint of the compiled program, so a
different graph, shape or option never hits another's entry); XLA reads its flags at its first
operation, so `import diffusion_tf` sets the flag (from the environment as it is then; the
folder is created by `apply()`), and a process that ran TensorFlow before runs without it. A folder
per TensorFlow version and CPU (a hash of its model name and feature flags) keeps one version's
executables from another's compiler, and one machine's code from another CPU: XLA:CPU loads an
entry compiled for other CPU features with only an ERROR line ("could lead to SIGILL"), so a home
folder shared between machines must not share entries. It is off by default because that ERROR
line is also printed on every hit on the same machine (TF 2.21 compares tuning pseudo-features
such as +prefer-no-gather with the host's ISA list), which a user reads as a failure. An explicit
`--tf_xla_persistent_cache_directory` in TF_XLA_FLAGS is left as the user set it.

`default_tensorflow_environ()` (also at `import diffusion_tf`, before TensorFlow is imported) sets
TF_ENABLE_ONEDNN_OPTS=0 unless the user set it. With oneDNN on, TensorFlow's CPU tensors come
from oneDNN's allocator, a pool that keeps every block it has handed out: after a 512 px
generation the temporaries of the VAE decode stay resident, and the peak is set by pool growth,
not by what is live. Measured (benchmarks/README.md, "Peak memory"): an LCM generation at 512 px
peaks at 6.59 GiB with it and 6.02 GiB without, at the same speed under XLA (whose kernels are its
own either way) and 2% faster in graph mode. A process that imported TensorFlow before
diffusion_tf keeps what TensorFlow read then.

Importing this module imports neither TensorFlow nor Keras.
"""

import contextlib
import dataclasses
import os

from diffusion_tf import compiler_memory

__all__ = ["Options", "apply", "configure", "default_tensorflow_environ", "from_environ", "options", "overridden"]


@dataclasses.dataclass(frozen=True)
class Options:
    """winograd: Winograd 3x3 convolutions where the shape rule picks them.
    keep_heap: keep large freed heap blocks (and the Winograd bound measured with them).
    home: the weights cache folder as given (None: ~/.cache/diffusion_tf).
    compile_cache: keep compiled XLA functions on disk for other processes (see the module)."""

    winograd: bool = True
    keep_heap: bool = True
    home: "str | None" = None
    compile_cache: bool = False

    def __post_init__(self):
        for name in ("winograd", "keep_heap", "compile_cache"):
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
        compile_cache=env.get("DIFFUSION_TF_COMPILE_CACHE", "0") == "1",
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


CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def home_dir():
    """The home option's folder, absolute (~/.cache/diffusion_tf when unset); not created here."""
    return os.path.abspath(os.path.expanduser(options().home or os.path.join("~", ".cache", "diffusion_tf")))


def cpu_fingerprint():
    """12 hex digits naming this CPU: its model name and feature flags (/proc/cpuinfo), or the
    platform's machine and processor strings where there is no /proc/cpuinfo."""
    import hashlib
    import platform

    text = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = {}
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
        text += " " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compile_cache_dir():
    """The persistent XLA compilation cache of this TensorFlow version and CPU:
    <home>/xla-cache/tf-<version>-<cpu_fingerprint()>."""
    from importlib import metadata

    try:
        version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:  # e.g. tensorflow-cpu or a source build
        import tensorflow as tf

        version = tf.__version__
    return os.path.join(home_dir(), "xla-cache", f"tf-{version}-{cpu_fingerprint()}")


def enable_compile_cache(environ=None):
    """With the compile_cache option, add the cache folder to TF_XLA_FLAGS unless a cache
    directory is given there already; returns the folder in effect, or None. `environ`: where
    TF_XLA_FLAGS is read and set (default os.environ); the option and the home folder are this
    process's `options()` (this runs at `import diffusion_tf`)."""
    env = os.environ if environ is None else environ
    flags = env.get("TF_XLA_FLAGS", "")
    given = _cache_flag(flags)
    if given is not None:
        return given or None
    if not options().compile_cache:
        return None
    folder = compile_cache_dir()
    env["TF_XLA_FLAGS"] = f"{flags} {CACHE_FLAG}={folder}".strip()
    return folder


def default_tensorflow_environ(environ=None):
    """Set TensorFlow's environment defaults of diffusion_tf where the user set none; returns
    what was set. Today one: TF_ENABLE_ONEDNN_OPTS=0 (the module docstring says why). Only
    effective before TensorFlow is imported (it reads the variable then)."""
    env = os.environ if environ is None else environ
    defaults = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    applied = {k: v for k, v in defaults.items() if k not in env}
    env.update(applied)
    return applied


def _cache_flag(flags):
    """The folder of a --tf_xla_persistent_cache_directory in TF_XLA_FLAGS' text ("" when given
    empty), or None when there is none."""
    for flag in flags.split():
        if flag.startswith(CACHE_FLAG + "="):
            return flag.split("=", 1)[1]
    return None


def _make_compile_cache_dir():
    """Create the folder named in TF_XLA_FLAGS (XLA does not); a read-only home only warns in
    XLA's log, the generation runs without the cache."""
    folder = _cache_flag(os.environ.get("TF_XLA_FLAGS", ""))
    if folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            pass


def apply():
    """Put the heap option into effect for this process: with keep_heap, glibc keeps large
    freed blocks (`compiler_memory.keep_large_blocks`; once per process, it cannot be undone);
    and point XLA's compilation cache at its folder (`enable_compile_cache`).
    Returns whether large blocks are kept."""
    _make_compile_cache_dir()
    if options().keep_heap:
        return compiler_memory.keep_large_blocks()
    return compiler_memory.large_blocks_kept()
