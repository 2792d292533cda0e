"""Hinton KD and Decoupled KD written the way their authors' code computes them (the oracles)."""

import torch
import torch.nn.functional as F

from ..precision import compute_dtype


def without_massless_classes(terms, target_probs):
    """KL terms with 0 where the target probability is 0 (0 log 0 = 0, xlogy's convention):
    ``F.kl_div`` gives NaN there when the input is -inf too, or with a log target at any -inf
    (a masked class). Where the target has mass its terms are kept as they are."""
    return terms.masked_fill(target_probs == 0, 0.0)


def kd_loss_reference(student_logits, teacher_logits, *, temperature):
    """Per-sample ``T^2 * KL(softmax(zt/T) || softmax(zs/T))``, shape [B]."""
    dtype = compute_dtype(student_logits, teacher_logits)
    log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    terms = F.kl_div(log_ps, log_pt, reduction="none", log_target=True)
    return temperature**2 * without_massless_classes(terms, log_pt.exp()).sum(1)


def dkd_loss_reference(student_logits, teacher_logits, target, *, alpha, beta, temperature):
    """Per-sample DKD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD = T^2 * KL over the binary split (p_target, p_rest) of softmax(z/T);
    NCKD = T^2 * KL between the softmaxes of the non-target logits, the target class pushed out by
    subtracting 1000 from its scaled logit, as the authors' code does.
    Returns ``(loss [B], {"tckd": [B], "nckd": [B]})``.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype) / temperature
    zt = teacher_logits.detach().to(dtype) / temperature
    gt_mask = F.one_hot(target, zs.shape[1]).to(torch.bool)

    def binary_split(probs):
        return torch.stack([(probs * gt_mask).sum(1), (probs * ~gt_mask).sum(1)], dim=1)

    binary_ps = binary_split(F.softmax(zs, dim=1))
    binary_pt = binary_split(F.softmax(zt, dim=1))
    tckd_terms = F.kl_div(binary_ps.log(), binary_pt, reduction="none")
    tckd = temperature**2 * without_massless_classes(tckd_terms, binary_pt).sum(1)

    log_qs = F.log_softmax(zs - 1000.0 * gt_mask, dim=1)
    qt = F.softmax(zt - 1000.0 * gt_mask, dim=1)
    nckd_terms = F.kl_div(log_qs, qt, reduction="none")
    nckd = temperature**2 * without_massless_classes(nckd_terms, qt).sum(1)

    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}
