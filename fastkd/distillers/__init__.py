"""Training tasks, one file per method, and the registry of methods.

Each is a timm ``TrainingTask``: ``task(images, target) -> {"loss", "output", <parts>}``. The
trainer's ``--distiller`` choices, its ``--<method>-<option>`` flags and ``build_distiller``
enumerate ``methods()``: the built-in ones, those registered with ``register_method`` and those
that installed packages declare in the entry-point group ``fastkd.methods`` (name = the method's
name, object = its ``Distiller`` subclass).
"""

import dataclasses
import functools
import re
from importlib.metadata import entry_points

from torch import nn

from ..options import MethodOptions
from .base import Distiller
from .ce import CE
from .dkd import DKD
from .hcd import HCD
from .kd import KD
from .ldrld import LDRLD

ENTRY_POINT_GROUP = "fastkd.methods"
_METHODS = {}  # name -> Distiller subclass, in registration order


def register_method(name: str, distiller_class: type[Distiller]) -> type[Distiller]:
    """Register ``distiller_class`` (a ``Distiller`` subclass) as method ``name``: it trains with
    ``train/main.py --distiller name`` and its options dataclass (``options_class``, a frozen
    ``fastkd.options.MethodOptions`` dataclass, or None) gives the flags ``--name-<field>``.
    ``name`` is lower case letters, digits and ``_``, starting with a letter; registering another
    class under a taken name is an error. Returns ``distiller_class`` (usable as a decorator's
    body)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method name must be lower case letters, digits and _, starting with "
                         f"a letter, got {name!r}")
    if not (isinstance(distiller_class, type) and issubclass(distiller_class, Distiller)):
        raise TypeError(f"method {name!r} must be a fastkd.distillers.Distiller subclass, got "
                        f"{distiller_class!r}")
    options_class = distiller_class.options_class
    if options_class is not None and not (
            dataclasses.is_dataclass(options_class) and issubclass(options_class, MethodOptions)):
        raise TypeError(f"{distiller_class.__name__}.options_class must be a dataclass deriving "
                        f"from fastkd.options.MethodOptions, got {options_class!r}")
    if _METHODS.get(name, distiller_class) is not distiller_class:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].__name__})")
    _METHODS[name] = distiller_class
    return distiller_class


@functools.cache
def _load_entry_points():
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        register_method(entry_point.name, entry_point.load())


def methods() -> dict[str, type[Distiller]]:
    """``{name: Distiller subclass}`` of every method, installed packages' ones included."""
    _load_entry_points()
    return dict(_METHODS)


def method_options_classes() -> dict[str, type[MethodOptions]]:
    """``{name: options dataclass}`` of the methods that have options."""
    return {name: distiller.options_class for name, distiller in methods().items()
            if distiller.options_class is not None}


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None = None,
                    options: MethodOptions | None = None, **settings) -> Distiller:
    """The distiller registered as ``name`` around ``student`` (and ``teacher``): ``options`` is
    the method's options dataclass (``fastkd.options``), keyword ``settings`` are its fields or
    the shared ones (``label_smoothing``, ``student_mean``, ``student_std``, ``backend``)."""
    registered = methods()
    if name not in registered:
        raise ValueError(f"distiller must be one of {tuple(registered)}, got {name!r}")
    if registered[name].needs_teacher and teacher is None:
        raise ValueError(f"distiller {name!r} needs a teacher model")
    return registered[name](student, teacher, options, **settings)


for _name, _distiller in (("ce", CE), ("kd", KD), ("dkd", DKD), ("ldrld", LDRLD), ("hcd", HCD)):
    register_method(_name, _distiller)

__all__ = ["CE", "DKD", "Distiller", "HCD", "KD", "LDRLD", "build_distiller",
           "method_options_classes", "methods", "register_method"]
