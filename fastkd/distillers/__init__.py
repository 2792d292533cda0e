"""Training tasks, one file per method: ``build_distiller(name, student, teacher, ...)``.

Each is a timm ``TrainingTask``: ``task(images, target) -> {"loss", "output", <parts>}``.
"""

from .base import Distiller
from .ce import CE
from .dkd import DKD
from .hcd import HCD
from .kd import KD
from .ldrld import LDRLD

DISTILLERS = {"ce": CE, "kd": KD, "dkd": DKD, "ldrld": LDRLD, "hcd": HCD}


def build_distiller(name, student, teacher=None, options=None, **settings):
    """The distiller registered as ``name`` around ``student`` (and ``teacher``): ``options`` is
    the method's options dataclass (``fastkd.options``), keyword ``settings`` are its fields or
    the shared ones (``label_smoothing``, ``student_mean``, ``student_std``, ``backend``)."""
    if name not in DISTILLERS:
        raise ValueError(f"distiller must be one of {tuple(DISTILLERS)}, got {name!r}")
    if name != "ce" and teacher is None:
        raise ValueError(f"distiller {name!r} needs a teacher model")
    return DISTILLERS[name](student, teacher, options, **settings)


__all__ = ["CE", "DKD", "DISTILLERS", "Distiller", "HCD", "KD", "LDRLD", "build_distiller"]
