"""LDRLD in closed form: all d(d-1)/2 pairs as one [B, d, d] tensor of logit gaps."""

import math

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from .common import binary_kl_of_gaps, kl_terms


def pair_weights(top_d, irw_eps, erd_scale, erd_decay, device, dtype):
    """``W[i, j] = ADW(i+1, j+1)`` for i != j, zero on the diagonal (symmetric), built on the
    logits' device: a cached host tensor would cost a host-to-device copy per call."""
    ranks = torch.arange(1, top_d + 1, device=device, dtype=dtype)
    rank_a, rank_b = ranks.unsqueeze(1), ranks.unsqueeze(0)
    weights = erd_scale * torch.exp(-erd_decay * (rank_a + rank_b)) / (
        (rank_a - rank_b).abs() + irw_eps)
    return weights.fill_diagonal_(0.0)


def ldrld_forward(student_logits, teacher_logits, target, *, temperature, top_d, alpha, beta,
                  ce_weight, irw_eps, erd_scale, erd_decay, top_set_weight, num_groups,
                  needs_grad=(True,)):
    """Per-row LDRLD loss ``[B]``, parts ``[B, 3]`` (ce, local, rntk) and the gradient w.r.t. the
    student logits (None unless ``needs_grad[0]``). With ``target`` None (no labels,
    ``ce_weight`` 0) there is no CE term and the ce column holds 0.

    G = pi(1..d), the student's top-d classes (torch.topk's order); s = zs / T, t = zt / T; each
    group S's term k_S T^2 KL(pt_S || ps_S) has gradient k_S T (ps_S - pt_S), and a pair's binary
    KL depends only on its logit gap, so

        dL/dzs_pi(i) = alpha T / n_groups (sum_j W_ij (sigmoid(s_i - s_j) - sigmoid(t_i - t_j))
                                           + w_G (ps_G - pt_G)_i)
        dL/dzs_c     = beta T (ps_R - pt_R)_c                     (c in R, the other classes)
    plus ce_weight (softmax(zs) - onehot(y)) everywhere.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype)
    zt = teacher_logits.to(dtype)
    batch, num_classes = zs.shape
    ranked = zs.topk(top_d, dim=1).indices  # [B, d], rank order
    top_s = zs.gather(1, ranked) / temperature
    top_t = zt.gather(1, ranked) / temperature

    gaps_s = top_s.unsqueeze(2) - top_s.unsqueeze(1)  # [B, d, d]: s_pi(i) - s_pi(j)
    gaps_t = top_t.unsqueeze(2) - top_t.unsqueeze(1)
    # The diagonal (weight 0) is -inf - -inf = NaN at a masked teacher class, and NaN * 0 is NaN:
    # 0 there, as it is for any finite logit.
    gaps_t.diagonal(dim1=1, dim2=2).zero_()
    weights = pair_weights(top_d, irw_eps, erd_scale, erd_decay, zs.device, dtype)
    # Each unordered pair appears twice in the symmetric weights.
    pair_sum = 0.5 * (binary_kl_of_gaps(gaps_t, gaps_s) * weights).sum(dim=(1, 2))
    log_ps_top = F.log_softmax(top_s, dim=1)
    log_pt_top = F.log_softmax(top_t, dim=1)
    pt_top = log_pt_top.exp()
    top_set_kl = kl_terms(pt_top, log_pt_top, log_ps_top).sum(dim=1)
    local = temperature**2 * (pair_sum + top_set_weight * top_set_kl) / num_groups

    has_rest = top_d < num_classes
    if has_rest:
        in_top = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, ranked, True)
        log_ps_rest = F.log_softmax((zs / temperature).masked_fill(in_top, -math.inf), dim=1)
        log_pt_rest = F.log_softmax((zt / temperature).masked_fill(in_top, -math.inf), dim=1)
        pt_rest = log_pt_rest.exp()
        # pt (log pt - log ps) would be 0 * (-inf + inf) on the top set (and at masked
        # classes): 0 there.
        rntk = temperature**2 * kl_terms(pt_rest, log_pt_rest, log_ps_rest).sum(dim=1)
    else:
        rntk = torch.zeros_like(local)

    if target is None:
        ce = torch.zeros_like(local)
        loss = alpha * local + beta * rntk
    else:
        log_probs = F.log_softmax(zs, dim=1)
        target = target.long().unsqueeze(1)
        ce = -log_probs.gather(1, target).squeeze(1)
        loss = ce_weight * ce + alpha * local + beta * rntk
    parts = torch.stack([ce, local, rntk], dim=1)
    if not needs_grad[0]:
        return loss, parts, (None,)

    if has_rest:
        grad = log_ps_rest.exp_().sub_(pt_rest).mul_(beta * temperature)  # 0 on the top set
    else:
        grad = torch.zeros_like(zs)
    if target is not None:
        grad.add_(log_probs.exp_(), alpha=ce_weight)
        grad.scatter_add_(1, target, grad.new_full(target.shape, -ce_weight))
    pair_grad = (weights * (torch.sigmoid(gaps_s) - torch.sigmoid(gaps_t))).sum(dim=2)
    top_set_grad = log_ps_top.exp() - pt_top
    top_grad = (alpha * temperature / num_groups) * (pair_grad + top_set_weight * top_set_grad)
    grad.scatter_add_(1, ranked, top_grad)
    return loss, parts, (grad.to(student_logits.dtype),)
