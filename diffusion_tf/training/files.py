"""Atomic file writes: a temporary file in the target's folder, renamed onto it, so that an
interrupted write (disk full, Ctrl-C) leaves the previous file whole."""

import contextlib
import os
import tempfile


def temp_path(path):
    """A new empty temporary file next to `path` (its folder created), for `publish`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def publish(tmp, path):
    """Renames `tmp` onto `path` (atomic) with the usual permissions (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path to write; on success it is renamed onto `path`, on any
    exception (KeyboardInterrupt included) it is removed and the exception goes on."""
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
