"""Decoupled KD, with the binary (target, rest) split taken from logit gaps."""

import math

import torch

from ..precision import compute_dtype
from ..reference.ldrld import masked_kl
from .common import binary_kl_of_gaps


def dkd_rows(student_logits, teacher_logits, target, *, alpha, beta, temperature):
    """Per-sample ``alpha * TCKD + beta * NCKD`` ``[B]`` and parts ``{"tckd", "nckd"}``.

    The binary split is a two-class softmax over (z_y / T, lse of the other z / T), so TCKD is a
    binary KL of the gaps g = z_y / T - lse_rest: no 1 - p_y, which cancels to garbage when the
    target holds nearly all the mass.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype)
    zt = teacher_logits.detach().to(dtype)
    target = target.long()
    # A comparison, not F.one_hot: one_hot reads the labels' range on the host (on CPU).
    is_target = target.unsqueeze(1) == torch.arange(zs.shape[1], device=zs.device)

    def target_gap(logits):
        scaled = logits / temperature
        rest_lse = scaled.masked_fill(is_target, -math.inf).logsumexp(dim=1)
        return scaled.gather(1, target.unsqueeze(1)).squeeze(1) - rest_lse

    tckd = temperature**2 * binary_kl_of_gaps(target_gap(zt), target_gap(zs))
    nckd = masked_kl(zs, zt, ~is_target, temperature)
    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}
