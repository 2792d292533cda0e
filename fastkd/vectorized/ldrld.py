"""LDRLD, vectorised: all d(d-1)/2 pairs as one [B, d, d] tensor of logit gaps."""

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from ..reference.ldrld import masked_kl
from .common import binary_kl_of_gaps


def pair_weights(top_d, irw_eps, erd_scale, erd_decay, device, dtype):
    """``W[i, j] = ADW(i+1, j+1)`` for i < j, zero elsewhere (each unordered pair counted once),
    built on the logits' device: a cached host tensor would cost a host-to-device copy per call."""
    ranks = torch.arange(1, top_d + 1, device=device, dtype=dtype)
    rank_a, rank_b = ranks.unsqueeze(1), ranks.unsqueeze(0)
    weights = erd_scale * torch.exp(-erd_decay * (rank_a + rank_b)) / (
        (rank_a - rank_b).abs() + irw_eps)
    return weights.triu(diagonal=1)


def ldrld_rows(student_logits, teacher_logits, target, *, temperature, top_d, alpha, beta,
               ce_weight, irw_eps, erd_scale, erd_decay, top_set_weight, num_groups):
    """Per-sample LDRLD loss ``[B]`` and parts ``{"ce", "local", "rntk"}`` (each ``[B]``); with
    ``target`` None (no labels, ``ce_weight`` 0) no CE term and no "ce" part."""
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    ranked = zs.detach().topk(top_d, dim=1).indices  # [B, d], rank order
    top_s = zs.gather(1, ranked) / temperature
    top_t = zt.gather(1, ranked) / temperature

    gaps_s = top_s.unsqueeze(2) - top_s.unsqueeze(1)  # [B, d, d]: zs_pi(i) - zs_pi(j), over T
    gaps_t = top_t.unsqueeze(2) - top_t.unsqueeze(1)
    weights = pair_weights(top_d, irw_eps, erd_scale, erd_decay, zs.device, dtype)
    pair_sum = (binary_kl_of_gaps(gaps_t, gaps_s) * weights).sum(dim=(1, 2))
    log_pt_top = F.log_softmax(top_t, dim=1)
    top_set_kl = (log_pt_top.exp() * (log_pt_top - F.log_softmax(top_s, dim=1))).sum(dim=1)
    local = temperature**2 * (pair_sum + top_set_weight * top_set_kl) / num_groups

    if top_d == zs.shape[1]:
        rntk = torch.zeros_like(local)
    else:
        in_top = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, ranked, True)
        rntk = masked_kl(zs, zt, ~in_top, temperature)

    distillation = alpha * local + beta * rntk
    parts = {"local": local, "rntk": rntk}
    if target is None:
        return distillation, parts
    ce = F.cross_entropy(zs, target.long(), reduction="none")
    return ce_weight * ce + distillation, {"ce": ce, **parts}
