"""HCD: Heterogeneous Complementary Distillation (shared/spec/hcd.md).

Per student stage: projector -> pooled feature p_s [B, D]; CFM(cat(p_s, f_t)) -> shared logits
S [B, n*C], which ``hcd_logit_loss`` splits, fuses with the teacher and trains. D = max(d_s, d_t)
with d_s the student's final feature width and d_t the teacher's embedding width. The projectors
and CFMs start as in the authors' code and OFA-KD, which it builds on (``init_weights``).
"""

import math

import torch
from timm.layers import trunc_normal_
from timm.utils import unwrap_model
from torch import nn

from ..functional import hcd_logit_loss, kd_loss
from ..losses import HCDLogitLoss
from ..methods.hcd import HCDOptions
from ..models.taps import embedding_width, stage_taps, student_outputs, teacher_outputs
from .base import Distiller, TeacherOutputs


def sep_conv(in_channels, out_channels):
    """One halving of resolution: dw 3x3 s2 -> 1x1 -> BN -> ReLU -> dw 3x3 -> 1x1 -> BN -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels,
                  bias=False),
        nn.Conv2d(in_channels, in_channels, 1, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MapProjector(nn.Sequential):
    """A [B, c, h, w] stage map -> [B, width]: one SepConv block per halving needed to reach the
    last stage's resolution (widths doubling, the last block giving ``width``), or a 1x1 conv for
    the last stage itself; then global average pooling."""

    def __init__(self, channels, halvings, width):
        if halvings == 0:
            blocks = [nn.Conv2d(channels, width, 1)]
        else:
            widths = [channels * 2**block for block in range(halvings)] + [width]
            blocks = [sep_conv(widths[block], widths[block + 1]) for block in range(halvings)]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class TokenProjector(nn.Sequential):
    """[B, N, c] tokens -> [B, width]: mean over tokens, LayerNorm, Linear. (The spec leaves the
    token projector open; this is the simplest map that matches the conv projector's output.)"""

    def __init__(self, channels, width):
        super().__init__(TokenMean(), nn.LayerNorm(channels), nn.Linear(channels, width))


class TokenMean(nn.Module):
    def forward(self, tokens):
        return tokens.mean(dim=1)


def complementary_feature_mapper(in_width, teacher_width, out_width, kind):
    """CFM: ``"mlp"`` = Linear(in, d_t) -> ReLU -> Linear(d_t, n*C); ``"linear"`` = Linear."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_width, teacher_width), nn.ReLU(inplace=True),
                             nn.Linear(teacher_width, out_width))
    if kind == "linear":
        return nn.Linear(in_width, out_width)
    raise ValueError(f"cfm must be 'mlp' or 'linear', got {kind!r}")


def init_weights(module):
    """OFA-KD's initialisation of the added modules: Linear weights trunc_normal_(std=0.02) with
    zero bias, conv weights kaiming_normal_(mode="fan_out") with zero bias; norms keep PyTorch's
    (weight 1, bias 0)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class HCDStudent(nn.Module):
    """Everything HCD trains, as one module (one DDP unit, one EMA): the student and, per tapped
    stage, a projector and a CFM. ``forward(images, teacher_embedding)`` returns
    ``(student_logits, [shared logits S [B, n*C] per stage])``."""

    def __init__(self, student, teacher_width, num_classes, options):
        super().__init__()
        self.student = student
        self.taps = stage_taps(student, options.stages)
        width = max(student.num_features, teacher_width)
        final_reduction = student.feature_info[-1]["reduction"]
        self.projectors = nn.ModuleList(
            TokenProjector(tap.channels, width) if tap.tokens
            else MapProjector(tap.channels, round(math.log2(final_reduction / tap.reduction)),
                              width)
            for tap in self.taps)
        self.mappers = nn.ModuleList(
            complementary_feature_mapper(width + teacher_width, teacher_width,
                                         options.num_sub * num_classes, options.cfm)
            for _ in self.taps)
        self.projectors.apply(init_weights)
        self.mappers.apply(init_weights)

    def forward(self, images, teacher_embedding):
        student_logits, stage_features = student_outputs(self.student, images, self.taps)
        shared_logits = [
            mapper(torch.cat([projector(features).float(), teacher_embedding.float()], dim=1))
            for features, projector, mapper in zip(stage_features, self.projectors, self.mappers)]
        return student_logits, shared_logits


class HCD(Distiller):
    """``HCD(student, teacher)`` for any pair of timm models (``num_classes``, if given, is
    checked against theirs); options as ``fastkd.methods.hcd.HCDOptions``.

    The task's loss is CE_eps(zs, y) + kd_weight T^2 KL(zt || zs) + sum over stages of
    (w_gt L_sce + w_sdd L_sdd + w_ol L_ol); its parts "ce", "kd", "sce", "sdd", "ol" are the
    weighted terms. L_sce and L_ol index the true class, so the target must be class indices.
    """

    options_class = HCDOptions
    loss_module = HCDLogitLoss
    needs_hard_labels = True

    def __init__(self, student, teacher, options=None, *, num_classes=None, teacher_width=None,
                 **settings):
        """``teacher_width``: d_t, needed (only) without a ``teacher``, whose outputs every call
        then brings."""
        super().__init__(student, teacher, options, num_classes=num_classes, **settings)
        if teacher is not None:
            teacher_width = embedding_width(teacher)
        elif not teacher_width:
            raise ValueError("HCD without a teacher model needs teacher_width (its embedding's "
                             "width d_t)")
        self.trainable_module = HCDStudent(student, teacher_width,
                                           getattr(student, "num_classes", num_classes),
                                           self.options)
        self.stage_options = dict(self.loss_keywords, label_smoothing=self.label_smoothing)

    @property
    def student(self):
        return self.hcd_student.student

    @property
    def hcd_student(self):
        return unwrap_model(self.trainable_module)

    def get_eval_model(self, module=None, ema=False):
        """The student alone (the projectors and CFMs serve training only)."""
        if module is None:
            module = unwrap_model(self.get_trainable_module(ema=ema))
        return module.student if isinstance(module, HCDStudent) else module

    def get_task_state(self, module=None, ema=False):
        """The projectors and CFMs, which are not part of the student's state_dict."""
        trainable = unwrap_model(self.get_trainable_module(ema=ema))
        return {"projectors": trainable.projectors.state_dict(),
                "mappers": trainable.mappers.state_dict()}

    def load_task_state(self, state, strict=True, module=None, ema=False):
        if state:
            trainable = unwrap_model(self.get_trainable_module(ema=ema))
            trainable.projectors.load_state_dict(state["projectors"], strict=strict)
            trainable.mappers.load_state_dict(state["mappers"], strict=strict)

    def run_teacher(self, teacher_images):
        return TeacherOutputs(*teacher_outputs(self.teacher.model, teacher_images))

    def compute(self, images, target, epoch):
        teacher_logits, teacher_embedding = self.teacher_outputs(images)
        if teacher_embedding is None:
            raise ValueError("HCD needs the teacher's embedding in teacher_outputs (a teacher "
                             "cache built with --distiller hcd holds it)")
        student_logits, shared_logits = self.trainable_module(images, teacher_embedding)
        weights = {"sce": self.options.w_gt, "sdd": self.options.w_sdd, "ol": self.options.w_ol}
        stage_total, parts = 0.0, dict.fromkeys(weights, 0.0)
        for shared in shared_logits:
            loss, stage_parts = hcd_logit_loss(shared, teacher_logits, student_logits, target,
                                               return_parts=True, **self.stage_options)
            stage_total = stage_total + loss
            for name, weight in weights.items():
                parts[name] = parts[name] + weight * stage_parts[name]
        ce = self.cross_entropy(student_logits, target)
        kd = self.options.kd_weight * kd_loss(student_logits, teacher_logits,
                                              temperature=self.options.temperature,
                                              backend=self.backend)
        # One fused computation per stage gives its three terms (detached) and the gradient of
        # their sum, so the loss is built from the stage totals; the parts sum to it up to
        # rounding.
        return self.result(student_logits, loss=ce + kd + stage_total, ce=ce, kd=kd, **parts)
