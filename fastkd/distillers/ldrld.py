"""LDRLD: ce_weight * CE + alpha L_local + beta L_rntk (shared/spec/ldrld.md)."""

from ..functional import ldrld_loss
from ..losses import LDRLDLoss
from ..methods.ldrld import LDRLDOptions
from .base import Distiller


class LDRLD(Distiller):
    """The CE term is the task's (label smoothing, or soft targets from mixup/cutmix); the fused
    loss runs with ce_weight=0 and no label: its local and remainder terms never use one."""

    options_class = LDRLDOptions
    loss_module = LDRLDLoss
    fixed_loss_options = {"ce_weight": 0.0}

    def compute(self, images, target, epoch):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.trainable_module(images)
        relational, parts = ldrld_loss(student_logits, teacher_logits, None,
                                       **self.loss_keywords, return_parts=True)
        ce = self.options.ce_weight * self.cross_entropy(student_logits, target)
        # Logged as its own terms, weighted as they enter the loss: alpha L_local, beta L_rntk.
        return self.result(student_logits, loss=ce + relational, ce=ce,
                           local=self.options.alpha * parts["local"],
                           rntk=self.options.beta * parts["rntk"])
