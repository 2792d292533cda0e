"""What the registry holds of a method (``Method``) and of its fused op (``FusedOp``): plain
records, read without importing torch."""

import dataclasses
import importlib
from dataclasses import dataclass

from ..options import MethodOptions


def load(dotted):
    """The object that ``"package.module:name"`` names, its module imported on first use."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class FusedOp:
    """A method's fused loss op, ``torch.ops.fastkd.<name>`` (``fastkd.ops`` registers it): the
    one list of its arguments, from which the op's schema, its fake and the keyword calls of
    every layer are made, and where its implementations live.

    - ``arguments``: the schema's arguments up to the options every op ends with
      (``bool compute_grad, str backend='auto'``), which the op adds;
    - ``logits``: the inputs whose dtypes set the compute dtype;
    - ``gradients``: the differentiable inputs, in the order the op returns their gradients;
    - ``parts``: the names of the loss-part columns, each its own term;
    - ``vectorized``, ``kernel``: its torch (CPU and any device) and Triton forwards, as
      ``"module:function"``; ``reference``: the oracle the tests hold both to."""

    name: str
    arguments: str
    logits: tuple[str, ...]
    gradients: tuple[str, ...]
    parts: tuple[str, ...]
    vectorized: str
    kernel: str
    reference: str

    @property
    def schema(self):
        outputs = ", ".join(["Tensor"] * (2 + len(self.gradients)))
        return (f"{self.name}({self.arguments}, bool compute_grad, str backend='auto') "
                f"-> ({outputs})")


@dataclass(frozen=True)
class Method:
    """A distillation method as the trainer's command line and every tool enumerate it.

    - ``distiller``: its ``fastkd.distillers.Distiller`` subclass, or ``"module:Class"`` to
      import it on first use (``load``); the class declares the next three as attributes;
    - ``options_class``: its options dataclass, the one source of its settings and defaults (the
      flags ``--<name>-<field>``), or None;
    - ``needs_teacher``: False trains the student alone (CE, the baseline);
    - ``needs_hard_labels``: True when a loss term indexes the true class (no mixup);
    - ``loss``: its public loss function (``"module:function"``), None for a plug-in;
    - ``op``: its fused op, None for a method without one."""

    name: str
    distiller: object
    options_class: type[MethodOptions] | None = None
    needs_teacher: bool = True
    needs_hard_labels: bool = False
    loss: str | None = None
    op: FusedOp | None = None

    def load(self):
        """The method's ``Distiller`` subclass, imported if it is not yet, checked to declare
        what this record says."""
        if not isinstance(self.distiller, str):
            return self.distiller
        distiller_class = load(self.distiller)
        declared = describe(self.name, distiller_class)
        if _declared(declared) != _declared(self):
            raise TypeError(f"method {self.name!r}: {self.distiller} declares {declared}, "
                            f"the registry {self}")
        return distiller_class


def _declared(method):
    """What a ``Distiller`` subclass declares of its method, as class attributes."""
    return method.options_class, method.needs_teacher, method.needs_hard_labels


def describe(name, distiller_class):
    """The ``Method`` that ``distiller_class``'s attributes declare, checked."""
    from ..distillers.base import Distiller  # a class given here means torch is imported

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
