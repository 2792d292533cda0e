"""DKD (Zhao et al., CVPR 2022): KD decoupled into the target class's binary KL (TCKD) and the
KL among the non-target classes (NCKD),
    L = CE(zs, y) + min(epoch / warm-up, 1) * (alpha TCKD + beta NCKD)."""

from dataclasses import dataclass

from ..options import MethodOptions, option
from .base import FusedOp, Method


@dataclass(frozen=True)
class DKDOptions(MethodOptions):
    """Decoupled KD (mdistiller's CIFAR-100 settings)."""

    alpha: float = option(1.0, "weight of TCKD, the target/non-target binary KL")
    beta: float = option(8.0, "weight of NCKD, the KL among non-target classes")
    temperature: float = option(4.0, "softmax temperature T")
    warmup_epochs: int = option(20, "epochs over which the DKD term ramps up linearly from 0",
                                distiller_only=True)


DKD = DKDOptions()

METHOD = Method(
    "dkd", "fastkd.distillers.dkd:DKD", DKDOptions, needs_hard_labels=True,
    loss="fastkd.functional:dkd_loss",
    op=FusedOp("dkd", "Tensor student_logits, Tensor teacher_logits, Tensor target, float alpha, "
                      "float beta, float temperature",
               logits=("student_logits", "teacher_logits"), gradients=("student_logits",),
               parts=("tckd", "nckd"), vectorized="fastkd.vectorized.dkd:dkd_forward",
               kernel="fastkd.kernels.kd:dkd_forward",
               reference="fastkd.reference.kd:dkd_loss_reference"))
