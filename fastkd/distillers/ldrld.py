"""LDRLD: ce_weight * CE + alpha L_local + beta L_rntk (shared/spec/ldrld.md)."""

from ..functional import ldrld_loss
from .base import Distiller, check_class_counts


class LDRLD(Distiller):
    def __init__(self, student, teacher, temperature=4.0, top_d=7, alpha=10.5, beta=7.0,
                 ce_weight=1.0, label_smoothing=0.0, backend="auto"):
        check_class_counts(student, teacher)
        super().__init__(student, teacher, label_smoothing)
        self.options = dict(temperature=temperature, top_d=top_d, alpha=alpha, beta=beta,
                            backend=backend)
        self.ce_weight = ce_weight

    def forward_train(self, images, target, **context):
        teacher_logits = self.teacher_logits(images)
        student_logits = self.student(images)
        # The CE term is kept apart (with the trainer's label smoothing); the fused loss runs with
        # ce_weight=0 and carries the local and remainder terms.
        relational = ldrld_loss(student_logits.float(), teacher_logits.float(), target,
                                ce_weight=0.0, **self.options)
        return student_logits, {"ce": self.ce_weight * self.cross_entropy(student_logits, target),
                                "kd": relational}
