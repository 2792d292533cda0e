"""LDRLD, vectorised: all d(d-1)/2 pairs as one [B, d, d] tensor of logit gaps."""

import functools

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from ..reference.ldrld import adaptive_decay_weight, masked_kl
from .common import binary_kl_of_gaps


@functools.lru_cache(maxsize=64)
def pair_weights(top_d, irw_eps, erd_scale, erd_decay):
    """``W[i, j] = ADW(i+1, j+1)`` for i < j, zero elsewhere (each unordered pair counted once)."""
    weights = torch.zeros(top_d, top_d, dtype=torch.float64)
    for i in range(top_d):
        for j in range(i + 1, top_d):
            weights[i, j] = adaptive_decay_weight(i + 1, j + 1, irw_eps, erd_scale, erd_decay)
    return weights


def ldrld_rows(student_logits, teacher_logits, target, temperature, top_d, alpha, beta, ce_weight,
               irw_eps, erd_scale, erd_decay, top_set_weight, num_groups):
    """Per-sample LDRLD loss ``[B]`` and parts ``{"ce", "local", "rntk"}`` (each ``[B]``)."""
    dtype = compute_dtype(student_logits)
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    ranked = zs.detach().topk(top_d, dim=1).indices  # [B, d], rank order
    top_s = zs.gather(1, ranked) / temperature
    top_t = zt.gather(1, ranked) / temperature

    gaps_s = top_s.unsqueeze(2) - top_s.unsqueeze(1)  # [B, d, d]: zs_pi(i) - zs_pi(j), over T
    gaps_t = top_t.unsqueeze(2) - top_t.unsqueeze(1)
    weights = pair_weights(top_d, irw_eps, erd_scale, erd_decay).to(zs.device, dtype)
    pair_sum = (binary_kl_of_gaps(gaps_t, gaps_s) * weights).sum(dim=(1, 2))
    log_pt_top = F.log_softmax(top_t, dim=1)
    top_set_kl = (log_pt_top.exp() * (log_pt_top - F.log_softmax(top_s, dim=1))).sum(dim=1)
    local = temperature**2 * (pair_sum + top_set_weight * top_set_kl) / num_groups

    if top_d == zs.shape[1]:
        rntk = torch.zeros_like(local)
    else:
        in_top = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, ranked, True)
        rntk = masked_kl(zs, zt, ~in_top, temperature)

    ce = F.cross_entropy(zs, target.long(), reduction="none")
    loss = ce_weight * ce + alpha * local + beta * rntk
    return loss, {"ce": ce, "local": local, "rntk": rntk}
