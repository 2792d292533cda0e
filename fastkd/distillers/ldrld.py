"""LDRLD: ce_weight * CE + alpha L_local + beta L_rntk (shared/spec/ldrld.md)."""

from ..functional import ldrld_loss
from ..options import LDRLDOptions
from .base import Distiller, dummy_batch


class LDRLD(Distiller):
    """The CE term is the task's (label smoothing, or soft targets from mixup/cutmix); the fused
    loss runs with ce_weight=0 and no label: its local and remainder terms never use one."""

    options_class = LDRLDOptions
    fixed_loss_options = {"ce_weight": 0.0}

    @classmethod
    def check_options(cls, options, num_classes):
        logits, target = dummy_batch(num_classes)
        ldrld_loss(logits, logits, target, **options.loss_options(), backend="torch")

    def compute(self, images, target, epoch):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.trainable_module(images)
        relational = ldrld_loss(student_logits, teacher_logits, None, **self.loss_keywords)
        return self.result(student_logits,
                           ce=self.options.ce_weight * self.cross_entropy(student_logits, target),
                           kd=relational)
