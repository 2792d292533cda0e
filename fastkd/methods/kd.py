"""KD (Hinton et al., 2015): the student's softened distribution matched to the teacher's,
    L = CE(zs, y) + weight * T^2 KL(softmax(zt / T) || softmax(zs / T))."""

from dataclasses import dataclass

from ..options import MethodOptions, option
from .base import FusedOp, Method


@dataclass(frozen=True)
class KDOptions(MethodOptions):
    """Hinton KD: ``weight * T^2 KL(softmax(zt/T) || softmax(zs/T))`` next to the CE term."""

    temperature: float = option(4.0, "softmax temperature T")
    weight: float = option(1.0, "weight of the KD term", distiller_only=True)


KD = KDOptions()

METHOD = Method(
    "kd", "fastkd.distillers.kd:KD", KDOptions, loss="fastkd.functional:kd_loss",
    op=FusedOp("kd", "Tensor student_logits, Tensor teacher_logits, float temperature",
               logits=("student_logits", "teacher_logits"), gradients=("student_logits",),
               parts=(), vectorized="fastkd.vectorized.kd:kd_forward",
               kernel="fastkd.kernels.kd:kd_forward",
               reference="fastkd.reference.kd:kd_loss_reference"))
