"""Decoupled KD: CE + warm-up factor * (alpha TCKD + beta NCKD)."""

from ..functional import dkd_loss
from ..losses import DKDLoss
from ..methods.dkd import DKDOptions
from .base import Distiller


class DKD(Distiller):
    """``task(images, target, epoch=e)`` scales the DKD term by min(e / warmup_epochs, 1), as the
    authors' code does (20 warm-up epochs on CIFAR-100); without ``epoch`` the factor is 1. TCKD
    splits off the true class, so the target must be class indices (no mixup/cutmix)."""

    options_class = DKDOptions
    loss_module = DKDLoss
    needs_hard_labels = True

    def compute(self, images, target, epoch):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.trainable_module(images)
        warmup_epochs = self.options.warmup_epochs
        warmup = 1.0 if epoch is None or not warmup_epochs else min(epoch / warmup_epochs, 1.0)
        dkd = dkd_loss(student_logits, teacher_logits, target, **self.loss_keywords)
        return self.result(student_logits, ce=self.cross_entropy(student_logits, target),
                           kd=warmup * dkd)
