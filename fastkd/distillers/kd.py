"""Hinton KD: CE + kd_weight * T^2 KL(teacher || student)."""

from ..functional import kd_loss
from .base import Distiller, check_class_counts


class KD(Distiller):
    def __init__(self, student, teacher, temperature=4.0, kd_weight=1.0, label_smoothing=0.0,
                 backend="auto"):
        check_class_counts(student, teacher)
        super().__init__(student, teacher, label_smoothing)
        self.temperature, self.kd_weight, self.backend = temperature, kd_weight, backend

    def forward_train(self, images, target, **context):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.student(images)
        kd = kd_loss(student_logits.float(), teacher_logits.float(),
                     temperature=self.temperature, backend=self.backend)
        return student_logits, {"ce": self.cross_entropy(student_logits, target),
                                "kd": self.kd_weight * kd}
