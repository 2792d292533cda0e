"""Public loss functions and backend dispatch.

Every loss validates its arguments, then runs one ``torch.ops.fastkd`` op (``fastkd.ops``),
which computes each row's loss and its gradient in one call, or the reference. ``backend``:
- ``auto``: the op's device dispatch: the Triton kernel for CUDA tensors when triton imports (for
  HCD only up to 1024 classes, where it was measured faster), else the vectorised torch code;
- ``triton``: the fused kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``torch``: the vectorised PyTorch code, on any device;
- ``reference``: the authors' formulation with autograd, slow on purpose (the oracle).
The environment variable ``FASTKD_BACKEND`` replaces ``auto`` with a fixed choice.

Logits may be fp16, bf16, fp32 or fp64, and teacher and student logits may differ in dtype (a
teacher run under autocast next to an fp32 student). Losses are computed in fp64 when any logits
are fp64, else in fp32 (``precision.compute_dtype``); each gradient comes back in its own input's
dtype. The teacher never gets a gradient.

Each method's keyword defaults are those of its options dataclass (``fastkd.methods.<method>``),
the one source of the method's defaults.
"""

import os

import torch
from torch import Tensor

from . import ops, reference, validation
from .methods.dkd import DKD
from .methods.hcd import HCD
from .methods.kd import KD
from .methods.ldrld import LDRLD
from .reference.hcd import hcd_logit_loss_reference

BACKENDS = ("auto", "triton", "torch", "reference")


def requested_backend(backend):
    """The backend a call asked for: ``backend``, or for "auto" the environment's
    ``FASTKD_BACKEND`` if set. "auto", "torch" and "triton" go to the op (``fastkd.ops``), whose
    device dispatch resolves "auto" and which refuses a "triton" that cannot run here;
    "reference" runs the oracle."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTKD_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def _needs_grad(*tensors):
    """Whether autograd will ask for a gradient of any of ``tensors``: the op then computes it."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _finish(loss_rows, parts, reduction, return_parts):
    """Reduce the per-row loss (and, for logging, the detached per-row parts)."""
    loss = _reduce(loss_rows, reduction)
    if not return_parts:
        return loss
    return loss, {name: _reduce(part.detach(), reduction) for name, part in parts.items()}


def ldrld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float = LDRLD.temperature,
    top_d: int = LDRLD.top_d,
    alpha: float = LDRLD.alpha,
    beta: float = LDRLD.beta,
    ce_weight: float = LDRLD.ce_weight,
    irw_eps: float = LDRLD.irw_eps,
    erd_scale: float = LDRLD.erd_scale,
    erd_decay: float = LDRLD.erd_decay,
    reduction: str = "mean",
    backend: str = "auto",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Local Dense Relational Logit Distillation (Xu et al., ICCV 2025).

    With G = {pi(1..d)} the student's top-d classes (ties to the lower class index in the triton
    backend, torch.topk's order elsewhere) and R the other classes, per sample:

        L = ce_weight * CE(zs, y) + alpha * L_local + beta * L_rntk
        L_local = (sum_{i<j<=d} ADW(i, j) KL_{pi(i), pi(j)} + KL_G) / (d(d-1)/2 + 1)
        L_rntk = KL_R
        ADW(r, r') = erd_scale * exp(-erd_decay (r + r')) / (|r - r'| + irw_eps)

    where KL_S = T^2 KL(softmax(zt_S / T) || softmax(zs_S / T)) over the classes in S.

    Args:
        student_logits: zs ``[B, C]``, C >= 2; fp16, bf16, fp32 or fp64.
        teacher_logits: zt ``[B, C]``, same device; its dtype may differ. Gets no gradient.
        target: y, class indices ``[B]`` (int). Only the CE term reads it, so with
            ``ce_weight=0`` it may also be None or soft targets ``[B, C]`` (timm's Mixup output:
            add a soft-target CE yourself).
        temperature: T > 0.
        top_d: d, in 1..C (the triton backend takes at most 32).
        alpha, beta, ce_weight: the terms' weights (finite).
        irw_eps, erd_scale, erd_decay: ADW's eps, scale and decay (finite).
        reduction: "mean" (over the batch), "sum" or "none" (``[B]``).
        backend: "auto", "triton", "torch" or "reference" (see the module's docstring).
        return_parts: also return the parts.

    Returns:
        The loss (a scalar, or ``[B]`` for "none"), in fp32 (fp64 for fp64 inputs). With
        ``return_parts``, ``(loss, {"ce", "local", "rntk"})``: unweighted, reduced like the
        loss, detached, so ``loss == ce_weight*ce + alpha*local + beta*rntk``; without class
        indices there is no "ce".

    Numbers may be numpy scalars; a bad argument raises ValueError or TypeError naming it.
    """
    validation.check_logits(student_logits, teacher_logits)
    top_d = validation.check_top_d(top_d, student_logits.shape[1])
    temperature = validation.check_positive("temperature", temperature)
    alpha, beta, ce_weight, irw_eps, erd_scale, erd_decay = validation.check_non_negative(
        alpha=alpha, beta=beta, ce_weight=ce_weight, irw_eps=irw_eps, erd_scale=erd_scale,
        erd_decay=erd_decay)
    labels = validation.check_ldrld_target(target, student_logits, ce_weight)
    validation.check_reduction(reduction)
    backend = requested_backend(backend)
    if backend == "reference":
        rows, parts = reference.ldrld_loss_reference(
            student_logits, teacher_logits, labels, temperature=temperature, top_d=top_d,
            alpha=alpha, beta=beta, ce_weight=ce_weight, irw_eps=irw_eps, erd_scale=erd_scale,
            erd_decay=erd_decay)
    else:
        rows, part_columns, _ = ops.call(
            "ldrld", student_logits=student_logits, teacher_logits=teacher_logits,
            target=labels, temperature=temperature, top_d=top_d, alpha=alpha, beta=beta,
            ce_weight=ce_weight, irw_eps=irw_eps, erd_scale=erd_scale, erd_decay=erd_decay,
            compute_grad=_needs_grad(student_logits), backend=backend)
        parts = ops.named_parts("ldrld", part_columns)
        if labels is None:
            del parts["ce"]  # the ce column holds no meaning without labels
    return _finish(rows, parts, reduction, return_parts)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *,
            temperature: float = KD.temperature, reduction: str = "mean",
            backend: str = "auto") -> Tensor:
    """Hinton KD: per sample ``T^2 * KL(softmax(zt/T) || softmax(zs/T))``.

    The plain formulation is already vectorised, so the torch backend is the reference.

    Args:
        student_logits: zs ``[B, C]``, C >= 2; fp16, bf16, fp32 or fp64.
        teacher_logits: zt ``[B, C]``, same device; its dtype may differ. Gets no gradient.
        temperature: T > 0.
        reduction: "mean" (over the batch), "sum" or "none" (``[B]``).
        backend: "auto", "triton", "torch" or "reference" (see the module's docstring).

    Returns:
        The loss (a scalar, or ``[B]`` for "none"), in fp32 (fp64 for fp64 inputs).
    """
    validation.check_logits(student_logits, teacher_logits)
    temperature = validation.check_positive("temperature", temperature)
    validation.check_reduction(reduction)
    backend = requested_backend(backend)
    if backend == "reference":
        rows = reference.kd_loss_reference(student_logits, teacher_logits,
                                           temperature=temperature)
    else:
        rows, _, _ = ops.call("kd", student_logits=student_logits,
                              teacher_logits=teacher_logits, temperature=temperature,
                              compute_grad=_needs_grad(student_logits), backend=backend)
    return _reduce(rows, reduction)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = DKD.alpha,
    beta: float = DKD.beta,
    temperature: float = DKD.temperature,
    reduction: str = "mean",
    backend: str = "auto",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Decoupled KD (Zhao et al., CVPR 2022): per sample ``alpha * TCKD + beta * NCKD``.

    TCKD = T^2 KL(b_t || b_s) on the binary split b = (p_y, 1 - p_y) of softmax(z/T);
    NCKD = T^2 KL(q_t || q_s) on the softmax of the non-target logits. No cross-entropy term (the
    DKD distiller adds it), as in the authors' code.

    Args:
        student_logits: zs ``[B, C]``, C >= 2; fp16, bf16, fp32 or fp64.
        teacher_logits: zt ``[B, C]``, same device; its dtype may differ. Gets no gradient.
        target: y, class indices ``[B]`` (int).
        alpha, beta: the weights of TCKD and NCKD (finite).
        temperature: T > 0.
        reduction: "mean" (over the batch), "sum" or "none" (``[B]``).
        backend: "auto", "triton", "torch" or "reference" (see the module's docstring).
        return_parts: also return the parts.

    Returns:
        The loss (a scalar, or ``[B]`` for "none"), in fp32 (fp64 for fp64 inputs). With
        ``return_parts``, ``(loss, {"tckd", "nckd"})``: unweighted, reduced like the loss,
        detached.
    """
    validation.check_logits(student_logits, teacher_logits)
    validation.check_target(target, student_logits)
    temperature = validation.check_positive("temperature", temperature)
    alpha, beta = validation.check_non_negative(alpha=alpha, beta=beta)
    validation.check_reduction(reduction)
    backend = requested_backend(backend)
    if backend == "reference":
        rows, parts = reference.dkd_loss_reference(student_logits, teacher_logits, target,
                                                   alpha=alpha, beta=beta,
                                                   temperature=temperature)
    else:
        rows, part_columns, _ = ops.call(
            "dkd", student_logits=student_logits, teacher_logits=teacher_logits, target=target,
            alpha=alpha, beta=beta, temperature=temperature,
            compute_grad=_needs_grad(student_logits), backend=backend)
        parts = ops.named_parts("dkd", part_columns)
    return _finish(rows, parts, reduction, return_parts)


def hcd_logit_loss(
    shared_logits: Tensor,
    teacher_logits: Tensor,
    student_logits: Tensor,
    target: Tensor,
    *,
    num_sub: int = HCD.num_sub,
    temperature: float = HCD.temperature,
    label_smoothing: float = 0.0,
    theta: float = HCD.theta,
    w_gt: float = HCD.w_gt,
    w_sdd: float = HCD.w_sdd,
    w_ol: float = HCD.w_ol,
    lam_s: float = HCD.lam_s,
    lam_t: float = HCD.lam_t,
    detach_target: bool = HCD.detach_target,
    reduction: str = "mean",
    backend: str = "auto",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """One stage of Heterogeneous Complementary Distillation (Xu et al., AAAI 2026): the shared
    logits ``S [B, n*C]`` split into n sub-logits, fused with the teacher and trained three ways.

    Per sample, with F_j = lam_s * S[:, jC:(j+1)C] + lam_t * zt and u_j the unit vector of F_j
    with its true-class entry set to 0:

        L_sce = (1/n) sum_j CE_eps(F_j, y)
        L_sdd = (1/n) sum_j T^2 KL(softmax(F_j/T) || softmax(zs/T))
        L_ol  = 1/(n(n-1)) sum_{j != k} relu(u_j . u_k - theta)^2     (0 for n = 1)
        L     = w_gt L_sce + w_sdd L_sdd + w_ol L_ol

    Gradients reach ``shared_logits`` and ``student_logits`` (the KL's target side too, unless
    ``detach_target``), each in its own dtype; never the teacher. The shared, teacher and student
    logits may differ in dtype.

    Args:
        shared_logits: S ``[B, n*C]``, the stage's shared logits (the mapper's output).
        teacher_logits: zt ``[B, C]``, same device. Gets no gradient.
        student_logits: zs ``[B, C]``, C >= 2; fp16, bf16, fp32 or fp64.
        target: y, class indices ``[B]`` (int).
        num_sub: n >= 1, the sub-logits S splits into.
        temperature: T > 0.
        label_smoothing: eps of CE_eps, in [0, 1).
        theta: the orthogonality margin (finite).
        w_gt, w_sdd, w_ol: the terms' weights (finite).
        lam_s, lam_t: the fusion weights (finite).
        detach_target: stop L_sdd's gradient through F_j.
        reduction: "mean" (over the batch), "sum" or "none" (``[B]``).
        backend: "auto", "triton", "torch" or "reference" (see the module's docstring).
        return_parts: also return the parts.

    Returns:
        The loss (a scalar, or ``[B]`` for "none"), in fp32 (fp64 for fp64 inputs). With
        ``return_parts``, ``(loss, {"sce", "sdd", "ol"})``: unweighted, reduced like the loss,
        detached.
    """
    validation.check_logits(student_logits, teacher_logits)
    validation.check_target(target, student_logits)
    num_sub = validation.check_shared_logits(shared_logits, student_logits, num_sub)
    temperature = validation.check_positive("temperature", temperature)
    label_smoothing = validation.check_probability("label_smoothing", label_smoothing)
    (theta,) = validation.check_finite(theta=theta)  # a cosine margin: any sign
    w_gt, w_sdd, w_ol, lam_s, lam_t = validation.check_non_negative(
        w_gt=w_gt, w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t)
    detach_target = validation.check_flag("detach_target", detach_target)
    validation.check_reduction(reduction)
    backend = requested_backend(backend)
    if backend == "reference":
        rows, parts = hcd_logit_loss_reference(
            shared_logits, teacher_logits, student_logits, target, num_sub=num_sub,
            temperature=temperature, label_smoothing=label_smoothing, theta=theta, w_gt=w_gt,
            w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t, detach_target=detach_target)
    else:
        rows, part_columns, _, _ = ops.call(
            "hcd", shared_logits=shared_logits, teacher_logits=teacher_logits,
            student_logits=student_logits, target=target, num_sub=num_sub,
            temperature=temperature, label_smoothing=label_smoothing, theta=theta, w_gt=w_gt,
            w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t, detach_target=detach_target,
            compute_grad=_needs_grad(shared_logits, student_logits), backend=backend)
        parts = ops.named_parts("hcd", part_columns)
    return _finish(rows, parts, reduction, return_parts)
