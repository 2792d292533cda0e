"""HCD's per-stage logit loss written term by term (shared/spec/hcd.md), one sub-logit at a time.

The oracle for the fast backends; autograd provides the gradients.
"""

import torch
import torch.nn.functional as F

from ..precision import compute_dtype


def orthogonality_loss(fused, target, theta):
    """Per sample: mean over the n(n-1) ordered pairs j != k of relu(cos(v_j, v_k) - theta)^2,
    where v_j is the fused sub-logit j with its true-class entry set to 0 (zero for n = 1)."""
    batch, num_sub, num_classes = fused.shape
    if num_sub == 1:
        return fused.new_zeros(batch)
    true_class = F.one_hot(target, num_classes).to(torch.bool).unsqueeze(1)
    directions = F.normalize(fused.masked_fill(true_class, 0.0), dim=2, eps=1e-12)
    cosines = directions @ directions.transpose(1, 2)
    off_diagonal = ~torch.eye(num_sub, dtype=torch.bool, device=fused.device)
    return (F.relu(cosines - theta) ** 2)[:, off_diagonal].sum(1) / (num_sub * (num_sub - 1))


def hcd_logit_loss_reference(shared_logits, teacher_logits, student_logits, target, *, num_sub,
                             temperature, label_smoothing, theta, w_gt, w_sdd, w_ol, lam_s, lam_t,
                             detach_target):
    """Per-sample ``w_gt * L_sce + w_sdd * L_sdd + w_ol * L_ol`` of one stage, and its parts.

    F_j = lam_s * S[:, jC:(j+1)C] + lam_t * zt;  L_sce = mean_j CE_eps(F_j, y);
    L_sdd = mean_j T^2 KL(softmax(F_j/T) || softmax(zs/T));  L_ol as ``orthogonality_loss``.
    Returns ``(loss [B], {"sce": [B], "sdd": [B], "ol": [B]})``.
    """
    dtype = compute_dtype(shared_logits, teacher_logits, student_logits)
    shared = shared_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    student = student_logits.to(dtype)
    num_classes = student.shape[1]
    log_ps = F.log_softmax(student / temperature, dim=1)

    fused, sce, sdd = [], 0.0, 0.0
    for j in range(num_sub):
        fused_j = lam_s * shared[:, j * num_classes:(j + 1) * num_classes] + lam_t * teacher
        fused.append(fused_j)
        sce = sce + F.cross_entropy(fused_j, target, reduction="none",
                                    label_smoothing=label_smoothing)
        kl_target = fused_j.detach() if detach_target else fused_j
        log_pf = F.log_softmax(kl_target / temperature, dim=1)
        sdd = sdd + temperature**2 * F.kl_div(log_ps, log_pf, reduction="none",
                                              log_target=True).sum(1)
    sce, sdd = sce / num_sub, sdd / num_sub
    ol = orthogonality_loss(torch.stack(fused, dim=1), target, theta)
    loss = w_gt * sce + w_sdd * sdd + w_ol * ol
    return loss, {"sce": sce, "sdd": sdd, "ol": ol}
