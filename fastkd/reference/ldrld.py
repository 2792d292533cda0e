"""LDRLD written the way the authors' code computes it: one masked full-width softmax per group.

This is the oracle the fast backends are tested against and the speed baseline they are measured
against. It is slow on purpose (d(d-1)/2 + 2 full-width passes per step) and follows the spec
(shared/spec/ldrld.md) term by term; autograd provides the gradient.
"""

import math

import torch
import torch.nn.functional as F

from ..ldrld_weights import adaptive_decay_weight
from ..precision import compute_dtype
from .kd import without_massless_classes


def masked_kl(student_logits, teacher_logits, group_mask, temperature):
    """T^2 * KL(pt_S || ps_S) per row, with S the classes where ``group_mask`` is True.

    Both softmaxes run over the full width with the classes outside S pushed to -inf. A class of
    S to which the teacher gives no probability (a -inf logit: a masked class) adds 0 log 0 = 0.
    """
    outside = ~group_mask
    log_ps = F.log_softmax((student_logits / temperature).masked_fill(outside, -math.inf), dim=1)
    log_pt = F.log_softmax((teacher_logits / temperature).masked_fill(outside, -math.inf), dim=1)
    pt = log_pt.exp()  # 0 outside S, where the terms are 0 * (-inf + inf)
    return temperature**2 * without_massless_classes(pt * (log_pt - log_ps), pt).sum(dim=1)


def ldrld_loss_reference(student_logits, teacher_logits, target, *, temperature, top_d, alpha,
                         beta, ce_weight, irw_eps, erd_scale, erd_decay):
    """Per-sample LDRLD loss and its parts.

    L = ce_weight * CE(zs, y) + alpha * L_local + beta * L_rntk, with
    L_local = (sum_{i<j<=d} ADW(i, j) KL_{pi(i), pi(j)} + KL_G) / (d(d-1)/2 + 1) and L_rntk = KL_R.

    Returns ``(loss [B], {"ce": [B], "local": [B], "rntk": [B]})``; with ``target`` None (no
    labels, ``ce_weight`` 0) the CE term and the "ce" part are left out. Inputs of any floating
    dtypes; the maths runs in float64 if either logits are float64, else in float32.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    num_classes = zs.shape[1]

    ranked = zs.topk(top_d, dim=1).indices  # [B, d]; column r-1 holds pi(r)

    def mask_of(columns):
        mask = torch.zeros_like(zs, dtype=torch.bool)
        return mask.scatter(1, ranked[:, columns], True)

    weighted_kl = []
    for i in range(top_d):
        for j in range(i + 1, top_d):
            weight = adaptive_decay_weight(i + 1, j + 1, irw_eps, erd_scale, erd_decay)
            weighted_kl.append(weight * masked_kl(zs, zt, mask_of([i, j]), temperature))
    # The authors' code treats the top set as one more group; for d = 2 it is the same pair again,
    # weighted like a pair.
    top_set_weight = 1.0
    if top_d == 2:
        top_set_weight = adaptive_decay_weight(1, 2, irw_eps, erd_scale, erd_decay)
    top_set = mask_of(list(range(top_d)))
    weighted_kl.append(top_set_weight * masked_kl(zs, zt, top_set, temperature))
    local = torch.stack(weighted_kl).sum(0) / len(weighted_kl)

    if top_d == num_classes:
        rntk = torch.zeros_like(local)
    else:
        rntk = masked_kl(zs, zt, ~top_set, temperature)

    distillation = alpha * local + beta * rntk
    parts = {"local": local, "rntk": rntk}
    if target is None:
        return distillation, parts
    ce = F.cross_entropy(zs, target, reduction="none")
    return ce_weight * ce + distillation, {"ce": ce, **parts}
