"""HCD: Heterogeneous Complementary Distillation (shared/spec/hcd.md).

Per student stage: projector -> pooled feature p_s [B, D]; CFM(cat(p_s, f_t)) -> shared logits
S [B, n*C], which ``hcd_logit_loss`` splits, fuses with the teacher and trains. D = max(d_s, d_t)
with d_s the student's final feature width and d_t the teacher's embedding width.
"""

import math

import torch
from torch import nn

from ..functional import hcd_logit_loss, kd_loss
from ..models.taps import embedding_width, stage_taps, student_outputs, teacher_outputs
from .base import Distiller, check_class_counts


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


class HCD(Distiller):
    """``HCD(student, teacher, num_classes)`` for any pair of timm models.

    Training forward returns ``(student_logits, {"ce", "kd", "sce", "sdd", "ol"})`` whose sum is
    CE_eps(zs, y) + w_kd T^2 KL(zt || zs) + sum over stages of (w_gt L_sce + w_sdd L_sdd +
    w_ol L_ol). The three stage terms come from one fused computation with one gradient: "sdd" and
    "ol" are detached values for logging and "sce" carries the gradient of all three, so
    backpropagate the sum, not an entry.
    """

    def __init__(self, student, teacher, num_classes, stages=(1, 2, 3, 4), num_sub=4, cfm="mlp",
                 temperature=1.0, kd_weight=1.0, label_smoothing=0.0, theta=0.5, w_gt=1.0,
                 w_sdd=6.0, w_ol=1.0, lam_s=1.0, lam_t=1.0, detach_target=False, backend="auto"):
        check_class_counts(student, teacher, num_classes)
        super().__init__(student, teacher, label_smoothing)
        self.taps = stage_taps(student, stages)
        teacher_width = embedding_width(teacher)
        width = max(student.num_features, teacher_width)
        final_reduction = student.feature_info[-1]["reduction"]
        self.projectors = nn.ModuleList(
            TokenProjector(tap.channels, width) if tap.tokens
            else MapProjector(tap.channels, round(math.log2(final_reduction / tap.reduction)),
                              width)
            for tap in self.taps)
        self.mappers = nn.ModuleList(
            complementary_feature_mapper(width + teacher_width, teacher_width,
                                         num_sub * num_classes, cfm)
            for _ in self.taps)
        self.temperature, self.kd_weight = temperature, kd_weight
        self.stage_options = dict(
            num_sub=num_sub, temperature=temperature, label_smoothing=label_smoothing,
            theta=theta, w_gt=w_gt, w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t,
            detach_target=detach_target, backend=backend)
        self.backend = backend

    def forward_train(self, images, target, **context):
        with torch.no_grad():
            teacher_logits, teacher_embedding = teacher_outputs(self.teacher, images)
        teacher_logits, teacher_embedding = teacher_logits.float(), teacher_embedding.float()
        student_logits, stage_features = student_outputs(self.student, images, self.taps)
        logits = student_logits.float()
        stage_total, parts = 0.0, {"sce": 0.0, "sdd": 0.0, "ol": 0.0}
        for features, projector, mapper in zip(stage_features, self.projectors, self.mappers):
            pooled = projector(features).float()
            shared_logits = mapper(torch.cat([pooled, teacher_embedding], dim=1)).float()
            loss, stage_parts = hcd_logit_loss(shared_logits, teacher_logits, logits, target,
                                               return_parts=True, **self.stage_options)
            stage_total = stage_total + loss
            for name, weight in (("sce", "w_gt"), ("sdd", "w_sdd"), ("ol", "w_ol")):
                parts[name] = parts[name] + self.stage_options[weight] * stage_parts[name]
        kd = kd_loss(logits, teacher_logits, temperature=self.temperature, backend=self.backend)
        return student_logits, {
            "ce": self.cross_entropy(student_logits, target),
            "kd": self.kd_weight * kd,
            "sce": stage_total - (parts["sdd"] + parts["ol"]),
            "sdd": parts["sdd"],
            "ol": parts["ol"],
        }
