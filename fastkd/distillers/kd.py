"""Hinton KD: CE + weight * T^2 KL(softmax(zt/T) || softmax(zs/T))."""

from ..functional import kd_loss
from ..losses import KDLoss
from ..methods.kd import KDOptions
from .base import Distiller


class KD(Distiller):
    options_class = KDOptions
    loss_module = KDLoss

    def compute(self, images, target, epoch):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.trainable_module(images)
        kd = kd_loss(student_logits, teacher_logits, **self.loss_keywords)
        return self.result(student_logits, ce=self.cross_entropy(student_logits, target),
                           kd=self.options.weight * kd)
