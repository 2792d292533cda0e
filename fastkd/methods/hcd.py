"""HCD (AAAI 2026; shared/spec/hcd.md): the student's stage features, projected and joined with
the teacher's embedding, mapped to shared logits; their n sub-logits fused with the teacher's
logits teach the student. Per tapped stage
    L_stage = w_gt L_sce + w_sdd L_sdd + w_ol L_ol,
beside CE(zs, y) and kd_weight T^2 KL(zt || zs)."""

from dataclasses import dataclass

from ..options import MethodOptions, option
from .base import FusedOp, Method


@dataclass(frozen=True)
class HCDOptions(MethodOptions):
    """HCD (shared/spec/hcd.md): per tapped stage w_gt L_sce + w_sdd L_sdd + w_ol L_ol, with
    ``kd_weight * T^2 KL(zt || zs)`` and the CE term beside."""

    num_sub: int = option(4, "n: sub-logits per stage")
    temperature: float = option(1.0, "softmax temperature T (stage KL and the KD term)")
    theta: float = option(0.5, "orthogonality margin: cosines above it are penalised")
    w_gt: float = option(1.0, "weight of the fused logits' cross-entropy L_sce")
    w_sdd: float = option(6.0, "weight of the fused-to-student KL L_sdd")
    w_ol: float = option(1.0, "weight of the orthogonality loss L_ol")
    lam_s: float = option(1.0, "fusion weight of the shared sub-logits")
    lam_t: float = option(1.0, "fusion weight of the teacher's logits")
    detach_target: bool = option(False, "stop the L_sdd gradient on the fused (target) side")
    stages: tuple = option((), "student stages (1-based) to tap; none given: all of them (4 for a "
                           "pyramid or a ViT, 3 for the CIFAR ResNets)", distiller_only=True)
    cfm: str = option("mlp", "complementary feature mapper", distiller_only=True,
                      choices=("mlp", "linear"))
    kd_weight: float = option(1.0, "weight of the KD term on the student's logits",
                              distiller_only=True)


HCD = HCDOptions()

METHOD = Method(
    "hcd", "fastkd.distillers.hcd:HCD", HCDOptions, needs_hard_labels=True,
    loss="fastkd.functional:hcd_logit_loss",
    op=FusedOp("hcd", "Tensor shared_logits, Tensor teacher_logits, Tensor student_logits, "
                      "Tensor target, int num_sub, float temperature, float label_smoothing, "
                      "float theta, float w_gt, float w_sdd, float w_ol, float lam_s, "
                      "float lam_t, bool detach_target",
               logits=("shared_logits", "teacher_logits", "student_logits"),
               gradients=("shared_logits", "student_logits"), parts=("sce", "sdd", "ol"),
               vectorized="fastkd.vectorized.hcd:hcd_forward",
               kernel="fastkd.kernels.hcd:hcd_forward",
               reference="fastkd.reference.hcd:hcd_logit_loss_reference"))
