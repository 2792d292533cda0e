"""No teacher: plain (label-smoothed or soft-target) cross-entropy, for teachers and baselines."""

from .base import Distiller


class CE(Distiller):
    needs_teacher = False

    def __init__(self, student, teacher=None, options=None, **settings):
        super().__init__(student, None, options, **settings)

    def compute(self, images, target, epoch):
        student_logits = self.trainable_module(images)
        return self.result(student_logits, ce=self.cross_entropy(student_logits, target))
