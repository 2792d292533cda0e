"""The registry of methods, read by the trainer's command line before torch is imported.

Each built-in method is described once, in its own module here (``fastkd.methods.ldrld``): its
options dataclass (the flags ``--<name>-<field>``), whether it needs a teacher and whether a loss
term indexes the true class (no mixup), its public loss, its fused op (arguments, parts, and
where its torch, Triton and reference implementations live) and its ``Distiller`` subclass
(``fastkd.distillers``), which is imported when a run builds it (``Method.load``). The trainer's
command line, the ops (``fastkd.ops``), the benchmarks and the tests enumerate ``methods()``:
the built-in methods, those registered with ``register_method`` and those that installed
packages declare in the entry-point group ``fastkd.methods`` (name = the method's name,
object = its ``Distiller`` subclass).
"""

import functools
import re
from importlib.metadata import entry_points

from ..options import MethodOptions
from . import ce, dkd, hcd, kd, ldrld
from .base import FusedOp, Method, describe

ENTRY_POINT_GROUP = "fastkd.methods"

# name -> Method, in registration order: the built-in methods' records, one module each.
_METHODS = {module.METHOD.name: module.METHOD for module in (ce, kd, dkd, ldrld, hcd)}
_BUILT_IN = frozenset(_METHODS)


def register_method(name: str, distiller_class: type) -> type:
    """Register ``distiller_class`` (a ``fastkd.distillers.Distiller`` subclass) as method
    ``name``: it trains with ``train/main.py --distiller name`` and its options dataclass
    (``options_class``, a frozen ``fastkd.options.MethodOptions`` dataclass, or None) gives the
    flags ``--name-<field>``. ``name`` is lower case letters, digits and ``_``, starting with a
    letter; registering another class under a taken name is an error. Returns
    ``distiller_class``."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method name must be lower case letters, digits and _, starting with "
                         f"a letter, got {name!r}")
    method = describe(name, distiller_class)
    if name in _METHODS and _METHODS[name].load() is not distiller_class:
        raise ValueError(f"method {name!r} is already registered "
                         f"({_METHODS[name].load().__name__})")
    if name not in _BUILT_IN:  # a built-in's record stays as declared
        _METHODS[name] = method
    return distiller_class


@functools.cache
def _load_entry_points():
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        register_method(entry_point.name, entry_point.load())


def methods() -> dict[str, Method]:
    """``{name: Method}`` of every method, installed packages' ones included."""
    _load_entry_points()
    return dict(_METHODS)


def method_options_classes() -> dict[str, type[MethodOptions]]:
    """``{name: options dataclass}`` of the methods that have options."""
    return {name: method.options_class for name, method in methods().items()
            if method.options_class is not None}


def fused_ops() -> dict[str, FusedOp]:
    """``{op name: FusedOp}`` of the built-in methods' fused ops (``torch.ops.fastkd.*``; a
    plug-in has none)."""
    return {method.op.name: method.op for method in _METHODS.values() if method.op is not None}
