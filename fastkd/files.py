"""Files that are whole or absent: what fastkd writes survives a crash or a power loss."""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_options):
    """Write ``path`` through a temporary file in the same folder: ``with atomic_write(p) as f``.

    On success the temporary file is flushed to disk (fsync), renamed over ``path`` and the folder
    is synced too, so that after a crash or power loss ``path`` holds either its old content or
    the new one, never a half-written or zero-length file. On error the temporary file is
    removed and ``path`` is untouched.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, mode, **open_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _fsync_directory(path):
    """Make a rename in ``path`` durable (the directory entry lives in the folder's own data)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def user_cache_dir():
    """``$XDG_CACHE_HOME/fastkd``, by default ``~/.cache/fastkd``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastkd")
