"""fastkd: fused, exact knowledge-distillation losses (LDRLD, HCD, DKD, KD) for PyTorch."""

from .functional import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss
from .losses import DKDLoss, HCDLogitLoss, KDLoss, LDRLDLoss

__version__ = "0.1.0"

__all__ = [
    "DKDLoss",
    "HCDLogitLoss",
    "KDLoss",
    "LDRLDLoss",
    "dkd_loss",
    "hcd_logit_loss",
    "kd_loss",
    "ldrld_loss",
]
