"""fastkd: fused, exact knowledge-distillation losses (LDRLD, DKD, KD) for PyTorch."""

from .functional import dkd_loss, kd_loss, ldrld_loss
from .losses import DKDLoss, KDLoss, LDRLDLoss

__version__ = "0.1.0"

__all__ = ["DKDLoss", "KDLoss", "LDRLDLoss", "dkd_loss", "kd_loss", "ldrld_loss"]
