"""Optional dependencies (triton, nvidia-dali): whether they import here."""

import functools
import importlib


@functools.lru_cache(maxsize=None)
def importable(module):
    """True when ``import module`` succeeds (checked once per process)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
