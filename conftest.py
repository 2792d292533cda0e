import inspect
import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter; the variable is read
# when the kernel modules are imported (lazily, by the first triton-backend call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

# The interpreter computes every lane in numpy, masked ones included: an overflow or invalid
# operation anywhere in a kernel fails the test instead of hiding behind a mask.
np.seterr(over="raise", invalid="raise", divide="raise", under="ignore")


def _memoise_the_interpreters_member_scan():
    """triton 3.8's interpreter patches ``triton.language`` for a kernel launch, and again at each
    call of a ``@triton.jit`` helper inside it (``_patch_builtin``: ``inspect.getmembers`` over
    four namespaces, ~0.6 ms a call, about 40% of the kernel tests' time once the kernels were
    split into phase helpers). The scan's result, which names are triton builtins, is computed
    here once per namespace before any launch; each call then patches the same names in the
    same states as before (a member already patched is no builtin: skipped). Another triton
    keeps its own interpreter."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_builtin", None)
    if (original is None or not hasattr(interpreter, "_patch_attr")
            or list(inspect.signature(original).parameters) != ["pkg", "builder", "scope"]):
        return
    namespaces = [tl, tl.core, tl.tensor, tl.math,
                  getattr(tl.core, "tensor_descriptor_base", None)]
    builtin_names = {id(pkg): [name for name, member in inspect.getmembers(pkg)
                               if tl.core.is_builtin(member)]
                     for pkg in namespaces if pkg is not None}

    def patch_builtin(pkg, builder, scope):
        names = builtin_names.get(id(pkg))
        if names is None:
            return original(pkg, builder, scope)
        for name in names:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtin


if os.environ.get("TRITON_INTERPRET") == "1":
    _memoise_the_interpreters_member_scan()
