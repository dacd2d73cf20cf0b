"""TensorFlow's start-up lines kept off the terminal: the one place that sets TensorFlow's
log levels, before TensorFlow is imported (`install()`, called by `import diffusion_tf`).

TensorFlow's C++ libraries log through absl before anything calls absl::InitializeLog(), and
absl then writes every message to stderr whatever TF_CPP_MIN_LOG_LEVEL says. So importing
TensorFlow prints "WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR", oneDNN's "custom operations are on" notice and, where no CUDA driver is
installed, "Could not find cuda drivers" and then a failed cuInit call (twice: two libraries
each log them). No environment variable turns these off, so `install()`:

- sets TF_CPP_MIN_LOG_LEVEL to 2 unless the user set it (TensorFlow's own meaning: 0 all,
  1 no INFO, 2 no WARNING either, 3 no ERROR either);
- hooks the first `import tensorflow`: while TensorFlow imports and lists its physical devices
  (where the cuInit call happens; listing them leaves every device setting still open),
  file descriptor 2 is a temporary file; afterwards its lines are written to the real stderr,
  in order, except TensorFlow's log records below TF_CPP_MIN_LOG_LEVEL (`filter_lines`).

Anything else written meanwhile (Python warnings, a C++ ERROR record at the default level,
text without a log prefix) is kept, only delayed to the end of the import; an exception
raised by the import is raised as usual. The failed cuInit call counts as INFO when the same
import already said that no CUDA driver is installed (it restates that fact); a failing
driver on a GPU machine is still an ERROR.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

DEFAULT_LEVEL = "2"
SEVERITIES = {"I": 0, "W": 1, "E": 2, "F": 3}
# A log record's first line: absl's "I0000 00:00:1796216605.744142    6399 port.cc:153] ...",
# or TensorFlow's older "2025-09-17 14:44:05.157831: I external/.../cudart_stub.cc:32] ...".
_RECORD = re.compile(
    r"^(?:(?P<absl>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s\]]+:\d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tsl>[IWEF]) [^\s\]]+:\d+\])"
)
# Text that is not TensorFlow's and starts anew: a Python warning ("file.py:12: UserWarning: ...")
# or traceback, kept with the lines after it whatever record came before.
_OTHER = re.compile(r"^(?:\S.*:\d+: \w+: |Traceback )")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_DRIVER = "Could not find cuda drivers"
_CUINIT_FAILED = "failed call to cuInit"


def min_level(environ=None):
    """TF_CPP_MIN_LOG_LEVEL as an int (0 when unset or not a number: nothing dropped)."""
    value = (os.environ if environ is None else environ).get("TF_CPP_MIN_LOG_LEVEL", "0")
    try:
        return int(value)
    except ValueError:
        return 0


def _records(text):
    """[(severity or None, lines)]: a record starts at a log prefix (or absl's banner) and
    takes the lines after it that start nothing new (a multi-line message); other text,
    and what follows it, has None."""
    records = []
    for line in text.splitlines(keepends=True):
        match = _RECORD.match(line)
        if match:
            records.append([SEVERITIES[match.group("absl") or match.group("tsl")], [line]])
        elif line.rstrip("\r\n") == _ABSL_BANNER:
            records.append([SEVERITIES["W"], [line]])
        elif records and not _OTHER.match(line):
            records[-1][1].append(line)
        else:
            records.append([None, [line]])
    return records


def filter_lines(text, level):
    """`text` without TensorFlow's log records below `level` (see the module docstring)."""
    records = _records(text)
    no_driver = any(sev is not None and _NO_DRIVER in lines[0] for sev, lines in records)
    kept = []
    for severity, lines in records:
        if severity is not None and no_driver and _CUINIT_FAILED in lines[0]:
            severity = SEVERITIES["I"]
        if severity is None or severity >= level:
            kept.extend(lines)
    return "".join(kept)


@contextlib.contextmanager
def filtered_stderr(level=None):
    """Inside the block, file descriptor 2 goes to a temporary file; on exit what it received
    is written to the real stderr through `filter_lines`. Without a usable descriptor 2 it
    does nothing."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = filter_lines(capture.read().decode("utf-8", "replace"), min_level() if level is None else level)
            if text:
                os.write(2, text.encode("utf-8"))


class _TensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, through the other finders, and runs its import filtered."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def filtered_exec_module(module):
            with filtered_stderr():
                exec_module(module)
                try:
                    module.config.list_physical_devices()
                except Exception:  # a device problem shows again where devices are first used
                    pass

        spec.loader.exec_module = filtered_exec_module
        return spec


def install():
    """Set TensorFlow's log level (unless set) and filter its start-up lines; once, and only
    while TensorFlow is not imported yet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)
    if "tensorflow" in sys.modules or any(isinstance(f, _TensorFlowImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TensorFlowImport())
