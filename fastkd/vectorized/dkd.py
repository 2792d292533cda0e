"""Decoupled KD in closed form, with the binary (target, rest) split taken from logit gaps."""

import math

import torch

from ..precision import compute_dtype
from .common import binary_kl_of_gaps, kl_terms


def dkd_forward(student_logits, teacher_logits, target, *, alpha, beta, temperature,
                needs_grad=(True,)):
    """Per-row ``alpha * TCKD + beta * NCKD`` ``[B]``, parts ``[B, 2]`` (tckd, nckd) and the
    gradient w.r.t. the student logits (None unless ``needs_grad[0]``).

    With s = zs / T, t = zt / T, q the softmax over the non-target classes and the gaps
    g = s_y - lse_{c != y}(s) (the binary split is a two-class softmax over (s_y, lse_rest), so
    TCKD is a binary KL of the gaps: no 1 - p_y, which cancels to garbage when the target holds
    nearly all the mass):

        dL/dzs_y = alpha T (sigmoid(g_s) - sigmoid(g_t))
        dL/dzs_c = T (beta (qs_c - qt_c) - alpha qs_c (sigmoid(g_s) - sigmoid(g_t)))   (c != y)
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    scaled_student = student_logits.to(dtype) / temperature
    scaled_teacher = teacher_logits.to(dtype) / temperature
    target = target.long().unsqueeze(1)
    # A comparison, not F.one_hot: one_hot reads the labels' range on the host (on CPU).
    is_target = target == torch.arange(scaled_student.shape[1], device=scaled_student.device)

    def non_target_softmax(scaled):
        """log q over the non-target classes (-inf at y) and the gap g = s_y - lse_rest."""
        rest = scaled.masked_fill(is_target, -math.inf)
        rest_lse = rest.logsumexp(dim=1, keepdim=True)
        return rest - rest_lse, (scaled.gather(1, target) - rest_lse).squeeze(1)

    log_qs, student_gap = non_target_softmax(scaled_student)
    log_qt, teacher_gap = non_target_softmax(scaled_teacher)
    qt = log_qt.exp()
    squared = temperature**2
    tckd = squared * binary_kl_of_gaps(teacher_gap, student_gap)
    # qt (log qt - log qs) would be 0 * (-inf + inf) at y (and at masked classes): 0 there.
    nckd = squared * kl_terms(qt, log_qt, log_qs).sum(1)
    loss = alpha * tckd + beta * nckd
    parts = torch.stack([tckd, nckd], dim=1)
    if not needs_grad[0]:
        return loss, parts, (None,)
    target_prob_gap = (torch.sigmoid(student_gap) - torch.sigmoid(teacher_gap)).unsqueeze(1)
    qs = log_qs.exp()
    grad = beta * (qs - qt) - alpha * qs * target_prob_gap
    grad = torch.where(is_target, alpha * target_prob_gap, grad).mul_(temperature)
    return loss, parts, (grad.to(student_logits.dtype),)
