"""No teacher: plain (label-smoothed) cross-entropy, for training teachers and baselines."""

from .base import Distiller


class CE(Distiller):
    def __init__(self, student, teacher=None, label_smoothing=0.0):
        super().__init__(student, None, label_smoothing)

    def forward_train(self, images, target, **context):
        student_logits = self.student(images)
        return student_logits, {"ce": self.cross_entropy(student_logits, target)}
