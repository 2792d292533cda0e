"""fastkd: fused, exact knowledge-distillation losses (LDRLD, HCD, DKD, KD) for PyTorch."""

__version__ = "0.1.0"  # before the imports: the trainer's --version reads it

from . import models  # noqa: F401 (registers the CIFAR nets, resnet8x4 ..., in timm)
from .distillers import register_method
from .functional import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss
from .losses import DKDLoss, HCDLogitLoss, KDLoss, LDRLDLoss

__all__ = [
    "DKDLoss",
    "HCDLogitLoss",
    "KDLoss",
    "LDRLDLoss",
    "dkd_loss",
    "hcd_logit_loss",
    "kd_loss",
    "ldrld_loss",
    "register_method",
]
