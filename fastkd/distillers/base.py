"""What every distiller shares: a timm ``TrainingTask`` around a student, a frozen teacher and the
method's options.

``task(images, target) -> {"loss", "output", <parts>}``: ``loss`` is the total to backpropagate,
``output`` the student's logits, the parts are detached values for logs. ``target`` is class
indices ``[B]`` or, from timm's Mixup/CutMix, soft targets ``[B, C]`` (refused by the methods that
need a hard label). Training loops written for timm's tasks drive these unchanged:
``prepare_distributed`` wraps only the trainable module in DDP, ``setup_ema``/``update_ema`` keep
an EMA of it, ``get_eval_model`` is the student and ``get_checkpoint_state`` saves the student's
weights under timm's ``state_dict`` key (the method's extra modules under ``task_state``).
"""

from typing import NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss
from timm.task.distillation import DistillationTeacher
from timm.utils import unwrap_model
from torch import nn


class TeacherOutputs(NamedTuple):
    """What a method reads of the teacher for a batch: its logits zt ``[B, C]`` and, for the
    methods that fuse it (HCD), its embedding ``[B, d_t]`` (the vector its classifier takes)."""

    logits: torch.Tensor
    embedding: torch.Tensor | None = None


def normalisation(model):
    """``(mean, std)`` a timm model expects its input normalised with: its pretrained_cfg's, or
    ImageNet's as DistillationTeacher assumes without one."""
    config = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    return (tuple(config.get("mean", IMAGENET_DEFAULT_MEAN)),
            tuple(config.get("std", IMAGENET_DEFAULT_STD)))


class Distiller(TrainingTask):
    """A student (``trainable_module``) trained with ``options_class``'s method against a frozen
    teacher.

    - ``teacher``: timm's ``DistillationTeacher`` (eval mode, no gradients, never in DDP). Its
      input is the student's, converted from the student's normalisation (``student_mean``,
      ``student_std``: what the data pipeline normalises with; default the student's own
      pretrained_cfg) to the teacher's (its pretrained_cfg): x_t = (x_s std_s + mean_s - mean_t)
      / std_t, decided once here so that a step costs no comparison.
    - ``options``: the method's options dataclass; keyword ``overrides`` replace its fields.
    - ``label_smoothing`` applies to the CE term on hard labels (soft targets carry their own).
    - ``num_classes``, if given, is checked against the student's and the teacher's.

    ``teacher`` may be None for a distilling method when every call brings the teacher's outputs
    (``teacher_outputs=``, e.g. read from a teacher cache): nothing then runs the teacher.
    """

    options_class = None  # the method's options dataclass (fastkd.methods.<method>), or None
    needs_teacher = True  # False: trains the student alone (CE, the baseline)
    needs_hard_labels = False  # True: a loss term indexes the true class (no mixup/cutmix)
    fixed_loss_options = {}  # loss arguments the method sets whatever its options say
    loss_module = None  # the method's fastkd.losses module, whose check checks its options

    @classmethod
    def check_options(cls, options, num_classes):
        """Raise the ``TypeError`` or ``ValueError`` that the method's loss gives ``options``
        (its message starting with the option's name), before any work: the trainer names the
        flag. The built-in methods run their loss on a dummy batch (``loss_module.check``)."""
        if cls.loss_module is not None:
            cls.loss_module.check(options, num_classes)

    def __init__(self, student, teacher=None, options=None, *, label_smoothing=0.0,
                 student_mean=None, student_std=None, backend="auto", num_classes=None,
                 **overrides):
        super().__init__(verbose=False)
        if self.options_class is None:
            if options is not None or overrides:
                raise TypeError(f"{type(self).__name__} takes no method options, got "
                                f"{sorted(overrides) or options}")
            self.options = None
        else:
            if options is not None and not isinstance(options, self.options_class):
                raise TypeError(f"{type(self).__name__} takes {self.options_class.__name__} "
                                f"options, got {type(options).__name__}")
            self.options = (options or self.options_class()).replace(**overrides)
            # The loss function's keyword arguments, once: a step only unpacks them.
            self.loss_keywords = {**self.options.loss_options(), **self.fixed_loss_options,
                                  "backend": backend}
        check_class_counts(student, teacher, num_classes)
        self.trainable_module = student
        self.backend = backend
        self.hard_label_loss = resolve_classification_loss(
            None, self.device, criterion_kwargs=dict(smoothing=label_smoothing))
        self.soft_target_loss = resolve_classification_loss(
            None, self.device, criterion_kwargs=dict(soft_targets=True))
        self.label_smoothing = label_smoothing
        self.teacher = None
        if teacher is not None:
            teacher.requires_grad_(False)
            self.teacher = DistillationTeacher(teacher)
            default_mean, default_std = normalisation(student)
            self._set_teacher_conversion(student_mean or default_mean, student_std or default_std,
                                         *normalisation(teacher))

    def _set_teacher_conversion(self, student_mean, student_std, teacher_mean, teacher_std):
        """x_t = x_s * scale + shift, or None when the two normalisations agree."""
        if (tuple(student_mean), tuple(student_std)) == (tuple(teacher_mean), tuple(teacher_std)):
            self.teacher_input_scale = self.teacher_input_shift = None
            return

        def column(values):
            return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

        scale = column(student_std) / column(teacher_std)
        shift = (column(student_mean) - column(teacher_mean)) / column(teacher_std)
        self.register_buffer("teacher_input_scale", scale, persistent=False)
        self.register_buffer("teacher_input_shift", shift, persistent=False)

    # -- the parts a subclass uses ----------------------------------------------------------------
    @property
    def student(self):
        """The student model itself (not the DDP or compiled wrapper)."""
        return unwrap_model(self.trainable_module)

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_input(self, images):
        if self.teacher_input_scale is None:
            return images
        return images * self.teacher_input_scale.to(images.dtype) + (
            self.teacher_input_shift.to(images.dtype))

    def teacher_logits(self, images):
        """zt for ``images``: the outputs given to this call, else the teacher's."""
        return self.teacher_outputs(images).logits

    def teacher_outputs(self, images):
        """``TeacherOutputs`` for ``images``: those given to this call (``forward``'s
        ``teacher_outputs``), else the teacher's, run without gradients."""
        if self.given_teacher_outputs is not None:
            return self.given_teacher_outputs
        if self.teacher is None:
            raise ValueError(f"{type(self).__name__} was built without a teacher: give each "
                             "call its teacher_outputs")
        with torch.no_grad():
            return self.run_teacher(self.teacher_input(images))

    def run_teacher(self, teacher_images):
        """The teacher's outputs for input already in its normalisation: what a teacher cache
        stores (``engine.cache_teacher``). Methods that read more than the logits override it."""
        return TeacherOutputs(self.teacher(teacher_images))

    def cross_entropy(self, student_logits, target):
        """CE on class indices (label-smoothed) or on soft targets [B, C] (mixup/cutmix)."""
        if target.is_floating_point():
            return self.soft_target_loss(student_logits.float(), target)
        return self.hard_label_loss(student_logits.float(), target)

    def check_target(self, target):
        if target is None:
            raise ValueError("target must be given: class indices [B] or soft targets [B, C]")
        if self.needs_hard_labels and target.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} needs class indices [B] as target (a loss term indexes "
                "the true class), got soft targets: train it without mixup/cutmix")

    # The teacher_outputs given to the call in progress (see teacher_outputs): an attribute
    # rather than an argument of compute, so that every method, plug-ins too, reads them the
    # same way.
    given_teacher_outputs = None

    def forward(self, input, target, epoch=None, teacher_outputs=None):
        """``{"loss", "output", <detached parts>}``; ``epoch`` (fractional) is for methods with
        a warm-up of their loss (DKD). ``teacher_outputs`` (``TeacherOutputs``), if given,
        stand in for the teacher's forward pass."""
        self.check_target(target)
        self.given_teacher_outputs = teacher_outputs
        try:
            return self.compute(input, target, epoch)
        finally:
            self.given_teacher_outputs = None

    def compute(self, images, target, epoch):
        raise NotImplementedError

    @staticmethod
    def result(output, loss=None, **terms):
        """The task's dict: ``loss`` (by default the sum of ``terms``) and the ``terms``
        detached, for logging."""
        return {"loss": sum(terms.values()) if loss is None else loss, "output": output,
                **{name: value.detach() for name, value in terms.items()}}

    # -- timm task protocol -----------------------------------------------------------------------
    def prepare_distributed(self, device_ids=None, **ddp_kwargs):
        """DDP around the trainable module only: the frozen teacher has nothing to reduce."""
        self.trainable_module = nn.parallel.DistributedDataParallel(
            self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend="inductor", mode=None, **compile_kwargs):
        """torch.compile the trainable module and the teacher (before ``prepare_distributed``,
        as timm orders it). Returns the compiled trainable module."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode,
                                              **compile_kwargs)
        if self.teacher is not None:
            self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module


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
