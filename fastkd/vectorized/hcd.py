"""HCD's per-stage logit loss, vectorised over samples and sub-logits ([B, n, C] at once).

Forward computes the loss and its gradients in closed form (the formulas of the fused kernel, in
PyTorch), and backward only scales them: the autograd graph of ~30 small ops would cost more than
the maths. Notation per sample: F_j = lam_s * S_j + lam_t * zt, q_j = softmax(F_j),
pf_j = softmax(F_j / T), ps = softmax(zs / T), u_j = v_j / |v_j| with v_j = F_j, true class 0.
"""

import torch
import torch.nn.functional as F

from ..precision import compute_dtype


def hcd_forward(shared_logits, teacher_logits, student_logits, target, *, num_sub, temperature,
                label_smoothing, theta, w_gt, w_sdd, w_ol, lam_s, lam_t, detach_target,
                needs_grad=(True, False, True)):
    """Per-row loss ``[B]``, parts ``[B, 3]`` (sce, sdd, ol) and gradients w.r.t. the shared and
    student logits in their dtypes (None where not needed)."""
    dtype = compute_dtype(shared_logits, teacher_logits, student_logits)
    batch, num_classes = student_logits.shape
    shared = shared_logits.to(dtype).reshape(batch, num_sub, num_classes)
    teacher = (lam_t * teacher_logits.to(dtype)).unsqueeze(1)
    student = student_logits.to(dtype)
    fused = torch.add(teacher, shared, alpha=lam_s)  # [B, n, C]
    target_index = target.long().view(batch, 1, 1).expand(batch, num_sub, 1)

    # Sub-logit CE with label smoothing: -(1 - eps) log q_j(y) - eps/C sum_c log q_j(c).
    log_q = F.log_softmax(fused, dim=2)
    ce = -(1.0 - label_smoothing) * log_q.gather(2, target_index).squeeze(2)
    if label_smoothing:
        ce -= (label_smoothing / num_classes) * log_q.sum(2)
    sce = ce.mean(1)

    # Sub-logit distillation: T^2 KL(pf_j || ps), the fused sub-logit as the target.
    log_pf = log_q if temperature == 1 else F.log_softmax(fused / temperature, dim=2)
    log_ps = F.log_softmax(student / temperature, dim=1).unsqueeze(1)
    pf = log_pf.exp()
    kl_terms = (log_pf - log_ps).mul_(pf)  # pf (log pf - log ps)
    kl = kl_terms.sum(2, keepdim=True)  # [B, n, 1]
    sdd = temperature**2 * kl.squeeze(2).mean(1)

    # Orthogonality: relu(cos - theta)^2 over the ordered off-diagonal pairs. ``fused`` is not
    # needed any more, so it becomes v_j (true class 0), normalised in place to u_j.
    directions = fused.scatter_(2, target_index, 0.0)
    inv_norms = directions.norm(dim=2, keepdim=True).clamp_min(1e-12).reciprocal()
    directions.mul_(inv_norms)
    cosines = directions @ directions.transpose(1, 2)  # [B, n, n]
    off_diagonal = ~torch.eye(num_sub, dtype=torch.bool, device=fused.device)
    excess = F.relu(cosines - theta) * off_diagonal
    pairs = max(num_sub * (num_sub - 1), 1)
    ol = (excess**2).sum((1, 2)) / pairs

    loss = w_gt * sce + w_sdd * sdd + w_ol * ol
    parts = torch.stack([sce, sdd, ol], dim=1)
    if not (needs_grad[0] or needs_grad[2]):
        return loss, parts, (None, None, None)

    # dL/dF_j = w_gt/n (q_j - smoothed) + w_sdd T/n pf_j (log pf_j - log ps - KL_j) + dOL/dv_j,
    # accumulated in place in the buffer of log q: on CPU every fresh [B, n, C] tensor costs
    # more in page faults than its arithmetic.
    ce_scale = w_gt / num_sub
    if temperature == 1:
        grad_fused = torch.mul(pf, ce_scale, out=log_q)
    else:
        grad_fused = log_q.exp_().mul_(ce_scale)
    grad_fused.sub_(ce_scale * label_smoothing / num_classes)
    grad_fused.scatter_add_(2, target_index, grad_fused.new_full(
        target_index.shape, -ce_scale * (1.0 - label_smoothing)))
    if not detach_target:
        kl_terms.addcmul_(pf, kl, value=-1.0)  # pf (log pf - log ps - KL)
        grad_fused.add_(kl_terms, alpha=w_sdd * temperature / num_sub)
    # dOL/du_j = g_j = 4/(n(n-1)) sum_k excess_jk u_k;  dOL/dv_j = (g_j - u_j (u_j . g_j)) / |v_j|.
    if num_sub > 1:
        coupling = (4.0 * w_ol / pairs) * excess
        along = (coupling * cosines).sum(2, keepdim=True)  # u_j . g_j
        grad_fused.baddbmm_(coupling * inv_norms, directions)
        grad_fused.addcmul_(directions, along * inv_norms, value=-1.0)
    if lam_s != 1:
        grad_fused.mul_(lam_s)
    # dL/dzs = w_sdd T (ps - mean_j pf_j).
    grad_student = (w_sdd * temperature) * (log_ps.squeeze(1).exp() - pf.mean(1))
    grad_shared = grad_fused.reshape(batch, num_sub * num_classes)
    return (loss, parts, (grad_shared.to(shared_logits.dtype) if needs_grad[0] else None, None,
                          grad_student.to(student_logits.dtype) if needs_grad[2] else None))

