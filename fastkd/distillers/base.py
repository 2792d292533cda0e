"""What every distiller shares: a student, an optional frozen teacher, extra trainable modules."""

import torch
import torch.nn.functional as F
from torch import nn


class Distiller(nn.Module):
    """Training-time wrapper around a student (and a frozen teacher).

    In training mode ``forward(images, target, **context)`` returns
    ``(student_logits, {loss_name: loss})``; the loss to minimise is the sum of the values. In
    eval mode it returns the student's logits alone. ``distiller.student`` is what is saved for
    inference; ``extra_parameters()`` are the distiller's own trainable modules (projectors,
    mappers), for the optimiser. The teacher stays in eval mode with no gradients.
    """

    def __init__(self, student, teacher=None, label_smoothing=0.0):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.label_smoothing = label_smoothing
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def extra_parameters(self):
        """Trainable parameters that belong to neither the student nor the teacher."""
        return [parameter for name, child in self.named_children()
                if name not in ("student", "teacher") for parameter in child.parameters()]

    def cross_entropy(self, student_logits, target):
        return F.cross_entropy(student_logits.float(), target,
                               label_smoothing=self.label_smoothing)

    def teacher_logits(self, images):
        with torch.no_grad():
            return self.teacher(images)

    def forward(self, images, target=None, **context):
        if not self.training:
            return self.student(images)
        if target is None:
            raise ValueError("target must be given in training mode (the labels of the batch)")
        return self.forward_train(images, target, **context)

    def forward_train(self, images, target, **context):
        raise NotImplementedError


def check_class_counts(student, teacher, num_classes=None):
    """Student, teacher (and the distiller's num_classes) must agree on the classes."""
    student_classes = getattr(student, "num_classes", None)
    teacher_classes = getattr(teacher, "num_classes", None)
    if student_classes and teacher_classes and student_classes != teacher_classes:
        raise ValueError(
            f"teacher has {teacher_classes} classes but the student has {student_classes}: "
            "distillation needs the same classes"
        )
    if num_classes is not None and student_classes and num_classes != student_classes:
        raise ValueError(f"num_classes is {num_classes} but the student has {student_classes}")
