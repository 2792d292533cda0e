"""Training tasks, one file per method; ``build_distiller`` makes the one a method's name gives.

Each is a timm ``TrainingTask``: ``task(images, target) -> {"loss", "output", <parts>}``. The
methods' names, options and requirements are in the registry (``fastkd.methods``), which the
trainer reads before torch is imported.
"""

from torch import nn

from ..methods import method_options_classes, methods, register_method
from ..options import MethodOptions
from .base import Distiller, TeacherOutputs
from .ce import CE
from .dkd import DKD
from .hcd import HCD
from .kd import KD
from .ldrld import LDRLD


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None = None,
                    options: MethodOptions | None = None, **settings) -> Distiller:
    """The distiller registered as ``name`` around ``student`` (and ``teacher``): ``options`` is
    the method's options dataclass (``fastkd.methods.<method>``), keyword ``settings`` are its
    fields or the shared ones (``label_smoothing``, ``student_mean``, ``student_std``,
    ``backend``). Without a ``teacher`` a distilling method's every call must bring the teacher's
    outputs (``Distiller.forward``'s ``teacher_outputs``)."""
    registered = methods()
    if name not in registered:
        raise ValueError(f"distiller must be one of {tuple(registered)}, got {name!r}")
    return registered[name].load()(student, teacher, options, **settings)


__all__ = ["CE", "DKD", "Distiller", "HCD", "KD", "LDRLD", "TeacherOutputs", "build_distiller",
           "method_options_classes", "methods", "register_method"]
