"""Hinton KD in closed form."""

import torch.nn.functional as F

from ..precision import compute_dtype
from .common import kl_terms


def kd_forward(student_logits, teacher_logits, target, *, temperature, needs_grad=(True,)):
    """Per-row ``L = T^2 KL(softmax(zt/T) || softmax(zs/T))`` ``[B]``, no parts (``[B, 0]``) and
    ``dL/dzs = T (ps - pt)`` in the student logits' dtype (None unless ``needs_grad[0]``).
    ``target`` is unused: it keeps the forwards' common signature."""
    dtype = compute_dtype(student_logits, teacher_logits)
    log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    pt = log_pt.exp()
    loss = temperature**2 * kl_terms(pt, log_pt, log_ps).sum(1)
    parts = loss.new_empty(loss.shape[0], 0)
    if not needs_grad[0]:
        return loss, parts, (None,)
    grad = log_ps.exp_().sub_(pt).mul_(temperature)
    return loss, parts, (grad.to(student_logits.dtype),)
