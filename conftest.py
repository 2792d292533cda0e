import gc
import os

import pytest

# The garbage collector is off until the collection is done, then what it made is frozen out of
# its reach (``pytest_collection``, below), as in the trainer's own process (``cli.start_up``).
gc.disable()

import torch  # noqa: E402

# Without a GPU the Triton kernels run on CPU tensors under the interpreter; the variable is read
# when the kernel modules are imported (lazily, by the first triton-backend call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

# The interpreter computes every lane in numpy, masked ones included: an overflow or invalid
# operation anywhere in a kernel fails the test instead of hiding behind a mask.
np.seterr(over="raise", invalid="raise", divide="raise", under="ignore")


def _patch_triton_language_once_per_launch():
    """triton 3.8's interpreter patches ``triton.language`` for a kernel launch (for its whole
    duration), and again at each call of a ``@triton.jit`` helper inside it, ours and triton's
    own (``tl.max``, ``tl.sum``): ``_patch_lang``, ``inspect.getmembers`` over four namespaces,
    ~0.6 ms a call. Here a helper call inside a launch that has patched the namespaces the
    helper sees patches nothing more: the same kernels run on the same patched language. The
    kernel tests (test_ldrld, _hcd, _masked_classes, _ops, _kd_dkd, _options) took 66 s in one
    process, 38 s with this. Another triton keeps its own interpreter."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    run = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if patch_lang is None or run is None or not hasattr(interpreter, "_LangPatchScope"):
        return
    launches = []  # per launch in progress: the namespaces it has patched (None until then)
    # A helper's patch is never restored (the interpreter drops its scope): triton.language.core,
    # which the launch does not patch but triton's own helpers (tl.max, tl.sum) see, stays
    # patched from their first call on.
    kept = set()

    def namespaces(fn):
        return frozenset(id(value) for value in fn.__globals__.values()
                         if value is tl or value is tl.core)

    def patch_once(fn):
        seen = namespaces(fn)
        if launches and launches[-1] is not None and seen <= launches[-1] | kept:
            return interpreter._LangPatchScope()  # nothing to restore
        scope = patch_lang(fn)
        if launches and launches[-1] is None:  # the launch's own patch, restored at its end
            launches[-1] = seen
        elif launches:
            kept.update(seen - launches[-1])
        return scope

    def launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return run(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()


@pytest.hookimpl(wrapper=True)
def pytest_collection():
    """What the collection imported (torch, timm, triton, DALI, the test modules: ~700,000
    objects) lives as long as the process: Python's full collections scanned it all, ~10 times
    during the imports and some 15 times more in each xdist worker's tests (~0.3 s each)."""
    from fastkd.engine.cli import start_up

    with start_up(own_process=True):  # the collector is already off since this file's import
        return (yield)

