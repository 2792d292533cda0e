"""LDRLD (Xu et al., ICCV 2025; shared/spec/ldrld.md): the teacher's relations among the
student's top-d classes distilled pair by pair, weighted by rank (Adaptive Decay Weights), with a
top-set term and a remaining-classes term,
    L = ce_weight CE(zs, y) + alpha L_local + beta L_rntk."""

from dataclasses import dataclass

from ..options import MethodOptions, option
from .base import FusedOp, Method


@dataclass(frozen=True)
class LDRLDOptions(MethodOptions):
    """LDRLD (shared/spec/ldrld.md; the authors' CIFAR-100 settings)."""

    temperature: float = option(4.0, "softmax temperature T")
    top_d: int = option(7, "d: the student's top-d classes whose pairs are distilled")
    alpha: float = option(10.5, "weight of the local term (pairs + top set)")
    beta: float = option(7.0, "weight of the remaining-classes term")
    ce_weight: float = option(1.0, "weight of the cross-entropy term")
    irw_eps: float = option(1.5, "ADW: eps of the inverse rank weight 1 / (|r - r'| + eps)")
    erd_scale: float = option(2.0, "ADW: scale of the exponential rank decay")
    erd_decay: float = option(0.05, "ADW: rate of the exponential rank decay")


LDRLD = LDRLDOptions()

METHOD = Method(
    "ldrld", "fastkd.distillers.ldrld:LDRLD", LDRLDOptions, loss="fastkd.functional:ldrld_loss",
    op=FusedOp("ldrld", "Tensor student_logits, Tensor teacher_logits, Tensor? target, "
                        "float temperature, int top_d, float alpha, float beta, float ce_weight, "
                        "float irw_eps, float erd_scale, float erd_decay",
               logits=("student_logits", "teacher_logits"), gradients=("student_logits",),
               parts=("ce", "local", "rntk"), vectorized="fastkd.vectorized.ldrld:ldrld_forward",
               kernel="fastkd.kernels.ldrld:ldrld_forward",
               reference="fastkd.reference.ldrld:ldrld_loss_reference"))
