"""The registry of methods, read by the trainer's command line before torch is imported.

A ``Method`` is what the command line must know of a method to check its flags: its options
dataclass (``fastkd.options``: the flags ``--<name>-<field>``), whether it needs a teacher and
whether a loss term indexes the true class (no mixup). Its ``Distiller`` subclass
(``fastkd.distillers``), which declares the same three as class attributes, is imported when a run
builds it (``Method.load``). ``methods()`` enumerates the built-in methods, those registered with
``register_method`` and those that installed packages declare in the entry-point group
``fastkd.methods`` (name = the method's name, object = its ``Distiller`` subclass).
"""

import dataclasses
import functools
import importlib
import re
from dataclasses import dataclass
from importlib.metadata import entry_points

from .options import DKDOptions, HCDOptions, KDOptions, LDRLDOptions, MethodOptions

ENTRY_POINT_GROUP = "fastkd.methods"


@dataclass(frozen=True)
class Method:
    name: str
    distiller: object  # its Distiller subclass, or "module:Class" to import it on first use
    options_class: type[MethodOptions] | None = None
    needs_teacher: bool = True  # False: trains the student alone (CE, the baseline)
    needs_hard_labels: bool = False  # True: a loss term indexes the true class

    def load(self):
        """The method's ``Distiller`` subclass, imported if it is not yet."""
        if not isinstance(self.distiller, str):
            return self.distiller
        module, _, name = self.distiller.partition(":")
        distiller_class = getattr(importlib.import_module(module), name)
        described = _describe(self.name, distiller_class)
        if described != dataclasses.replace(self, distiller=distiller_class):
            raise TypeError(f"method {self.name!r}: {self.distiller} declares {described}, "
                            f"the registry {self}")
        return distiller_class


_METHODS = {method.name: method for method in (  # name -> Method, in registration order
    Method("ce", "fastkd.distillers.ce:CE", needs_teacher=False),
    Method("kd", "fastkd.distillers.kd:KD", KDOptions),
    Method("dkd", "fastkd.distillers.dkd:DKD", DKDOptions, needs_hard_labels=True),
    Method("ldrld", "fastkd.distillers.ldrld:LDRLD", LDRLDOptions),
    Method("hcd", "fastkd.distillers.hcd:HCD", HCDOptions, needs_hard_labels=True),
)}
_BUILT_IN = frozenset(_METHODS)


def _describe(name, distiller_class):
    """The ``Method`` that ``distiller_class``'s attributes declare, checked."""
    from .distillers.base import Distiller  # a class given here means torch is imported

    if not (isinstance(distiller_class, type) and issubclass(distiller_class, Distiller)):
        raise TypeError(f"method {name!r} must be a fastkd.distillers.Distiller subclass, got "
                        f"{distiller_class!r}")
    options_class = distiller_class.options_class
    if options_class is not None and not (
            dataclasses.is_dataclass(options_class) and issubclass(options_class, MethodOptions)):
        raise TypeError(f"{distiller_class.__name__}.options_class must be a dataclass deriving "
                        f"from fastkd.options.MethodOptions, got {options_class!r}")
    return Method(name, distiller_class, options_class, distiller_class.needs_teacher,
                  distiller_class.needs_hard_labels)


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
    method = _describe(name, distiller_class)
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
