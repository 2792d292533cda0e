"""Decoupled KD: CE + warm-up factor * (alpha TCKD + beta NCKD)."""

from ..functional import dkd_loss
from .base import Distiller, check_class_counts


class DKD(Distiller):
    """``forward(images, target, epoch=e)`` scales the DKD term by min(e / warmup_epochs, 1), as
    the authors' code does (20 warm-up epochs on CIFAR-100); without ``epoch`` the factor is 1."""

    def __init__(self, student, teacher, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20,
                 label_smoothing=0.0, backend="auto"):
        check_class_counts(student, teacher)
        super().__init__(student, teacher, label_smoothing)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs, self.backend = warmup_epochs, backend

    def forward_train(self, images, target, epoch=None, **context):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.student(images)
        warmup = 1.0 if epoch is None or not self.warmup_epochs else min(
            epoch / self.warmup_epochs, 1.0)
        dkd = dkd_loss(student_logits.float(), teacher_logits.float(), target, alpha=self.alpha,
                       beta=self.beta, temperature=self.temperature, backend=self.backend)
        return student_logits, {"ce": self.cross_entropy(student_logits, target),
                                "kd": warmup * dkd}
