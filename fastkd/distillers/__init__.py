"""Training-side wrappers, one file per method: ``DISTILLERS[name](student, teacher, ...)``."""

from .base import Distiller
from .ce import CE
from .dkd import DKD
from .hcd import HCD
from .kd import KD
from .ldrld import LDRLD

DISTILLERS = {"ce": CE, "kd": KD, "dkd": DKD, "ldrld": LDRLD, "hcd": HCD}


def build_distiller(name, student, teacher=None, **options):
    """The distiller registered as ``name``, around ``student`` (and ``teacher``)."""
    if name not in DISTILLERS:
        raise ValueError(f"distiller must be one of {tuple(DISTILLERS)}, got {name!r}")
    if name != "ce" and teacher is None:
        raise ValueError(f"distiller {name!r} needs a teacher model")
    return DISTILLERS[name](student, teacher, **options)


__all__ = ["CE", "DKD", "DISTILLERS", "Distiller", "HCD", "KD", "LDRLD", "build_distiller"]
