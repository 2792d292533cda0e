"""Decoupled KD, with the binary split taken from log-sum-exps instead of summed probabilities."""

import math

import torch
import torch.nn.functional as F

from ..reference.ldrld import masked_kl


def dkd_rows(student_logits, teacher_logits, target, alpha, beta, temperature):
    """Per-sample ``alpha * TCKD + beta * NCKD`` ``[B]`` and parts ``{"tckd", "nckd"}``.

    log p_rest = lse(non-target logits) - lse(all logits), never log(1 - p_target), which cancels
    to garbage when the target holds nearly all the mass.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    is_target = F.one_hot(target.long(), zs.shape[1]).to(torch.bool)

    def log_binary_split(logits):
        scaled = logits / temperature
        log_total = scaled.logsumexp(dim=1)
        log_rest = scaled.masked_fill(is_target, -math.inf).logsumexp(dim=1)
        log_target = scaled.gather(1, target.long().unsqueeze(1)).squeeze(1)
        return torch.stack([log_target - log_total, log_rest - log_total], dim=1)

    log_ps, log_pt = log_binary_split(zs), log_binary_split(zt)
    tckd = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    nckd = masked_kl(zs, zt, ~is_target, temperature)
    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}
