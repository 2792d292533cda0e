"""Fused HCD per-stage logit loss (Heterogeneous Complementary Distillation, shared/spec/hcd.md).

One program per sample. It reads the sample's n*C shared logits S, its C teacher logits zt and C
student logits zs, forms the fused sub-logits F_j = lam_s S_j + lam_t zt as an [n, C] tile, and
in the same launch writes the loss, its parts and the gradients w.r.t. S and zs:

    L_sce = mean_j CE_eps(F_j, y)                 dL/dF_j += w_gt/n (q_j - smoothed)
    L_sdd = mean_j T^2 KL(pf_j || ps)             dL/dF_j += w_sdd T/n pf_j (log pf_j/ps - KL_j)
                                                  dL/dzs   = w_sdd T (ps - mean_j pf_j)
    L_ol  = mean_{j!=k} relu(u_j . u_k - theta)^2 dL/dv_j  = (g_j - u_j (u_j . g_j)) / |v_j|,
                                                  g_j = 4/(n(n-1)) sum_k relu(.)_jk u_k
    dL/dS_j = lam_s dL/dF_j

with q_j = softmax(F_j), pf_j = softmax(F_j / T), ps = softmax(zs / T), v_j = F_j with its
true-class entry 0 and u_j = v_j / |v_j|. The n x n cosine matrix is accumulated on chip with
tl.dot (sub-logits padded to 16 rows, the smallest dot tile). Rows that fit one tile are read
once; wider rows are streamed twice (statistics, then gradients).
"""

import functools

import torch
import triton
import triton.language as tl

from .autograd import RowLossFunction
from .common import (
    NEG_FILL,
    accumulator_dtype,
    compute_dtype,
    load_block,
    online_logsumexp,
    optional_output,
    row_major,
    row_outputs,
)

MAX_NUM_SUB = 16
SUB_BLOCK = 16  # tl.dot's smallest tile: sub-logits beyond num_sub are masked rows
MAX_TILE = 16384  # elements of the [SUB_BLOCK, BLOCK] tile kept in registers
STREAM_BLOCK = 256  # block width of rows wider than one tile (hcd_launch_config)


@triton.jit
def _load_tile(shared_row, teacher_row, student_row, subs, is_sub, block_cols, num_classes,
               lam_s, lam_t, ACC: tl.constexpr):
    """Fused sub-logits F [SUB_BLOCK, BLOCK] (masked lanes 0) and student logits [BLOCK] (masked
    lanes NEG_FILL) of one block of classes."""
    in_row = block_cols < num_classes
    in_tile = is_sub[:, None] & in_row[None, :]
    shared = tl.load(shared_row + subs[:, None] * num_classes + block_cols[None, :],
                     mask=in_tile, other=0.0).to(ACC)
    teacher = tl.load(teacher_row + block_cols, mask=in_row, other=0.0).to(ACC)
    fused = tl.where(in_tile, lam_s * shared + lam_t * teacher[None, :], 0.0)
    return in_row, in_tile, fused, load_block(student_row, block_cols, in_row, ACC)


@triton.jit
def _online_row_logsumexp(row_max, row_sum, values, mask):
    """``online_logsumexp`` for each row of a [R, BLOCK] block."""
    values = tl.where(mask, values, NEG_FILL)
    new_max = tl.maximum(row_max, tl.max(values, axis=1))
    exps = tl.where(mask, tl.exp(values - new_max[:, None]), 0.0)
    return new_max, row_sum * tl.exp(row_max - new_max) + tl.sum(exps, axis=1)


@triton.jit
def _online_row_kl_dot(row_max, row_sum, row_dot, fused_scaled, student_scaled, mask):
    """Streamed ``sum_c exp(F_jc/T - max_j) (F_jc/T - zs_c/T)`` per row with its log-sum-exp:
    KL_j = row_dot / row_sum - lse_j + lse(zs / T)."""
    values = tl.where(mask, fused_scaled, NEG_FILL)
    new_max = tl.maximum(row_max, tl.max(values, axis=1))
    rescale = tl.exp(row_max - new_max)
    exps = tl.where(mask, tl.exp(values - new_max[:, None]), 0.0)
    gaps = tl.where(mask, fused_scaled - student_scaled[None, :], 0.0)
    row_dot = row_dot * rescale + tl.sum(exps * gaps, axis=1)
    return new_max, row_sum * rescale + tl.sum(exps, axis=1), row_dot


@triton.jit
def _tile_stats(q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum,
                fused, student, in_row, in_tile, block_cols, target, inv_temperature):
    """Fold one tile into the per-sub-logit statistics: log-sum-exp of F_j (q) and of F_j / T
    with the KL dot product (pf), the sum of F_j, the Gram matrix of the v_j, and the student's
    log-sum-exp at T (s)."""
    q_max, q_sum = _online_row_logsumexp(q_max, q_sum, fused, in_tile)
    pf_max, pf_sum, pf_dot = _online_row_kl_dot(pf_max, pf_sum, pf_dot, fused * inv_temperature,
                                                student * inv_temperature, in_tile)
    s_max, s_sum = online_logsumexp(s_max, s_sum, student * inv_temperature, in_row)
    without_target = tl.where((block_cols == target)[None, :], 0.0, fused)
    gram += tl.dot(without_target, tl.trans(without_target), input_precision="ieee")
    return (q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum + tl.sum(fused, axis=1), gram,
            s_max, s_sum)


@triton.jit
def _tile_grads(fused, student, in_tile, block_cols, target, q_lse, pf_lse, s_lse, kl, inv_norm,
                coupling, along, inv_temperature, temperature, ce_scale, label_smoothing,
                num_classes, num_sub, w_sdd, lam_s, DETACH_TARGET: tl.constexpr):
    """dL/dS [SUB_BLOCK, BLOCK] and dL/dzs [BLOCK] for one tile of classes."""
    is_target = (block_cols == target)[None, :]
    q = tl.exp(fused - q_lse[:, None])
    smoothed = label_smoothing / num_classes + tl.where(is_target, 1.0 - label_smoothing, 0.0)
    grad = ce_scale * (q - smoothed)
    log_pf = fused * inv_temperature - pf_lse[:, None]
    pf = tl.where(in_tile, tl.exp(log_pf), 0.0)
    log_ps = student * inv_temperature - s_lse
    if not DETACH_TARGET:
        grad += (w_sdd * temperature / num_sub) * pf * (log_pf - log_ps[None, :] - kl[:, None])
    directions = tl.where(in_tile & ~is_target, fused, 0.0) * inv_norm[:, None]
    pulled = tl.dot(coupling, directions, input_precision="ieee")
    grad += (pulled - directions * along[:, None]) * inv_norm[:, None]
    grad_student = w_sdd * temperature * (tl.exp(log_ps) - tl.sum(pf, axis=0) / num_sub)
    return lam_s * grad, grad_student


@triton.jit
def _hcd_kernel(
    shared_ptr, teacher_ptr, student_ptr, target_ptr, loss_ptr, parts_ptr,
    grad_shared_ptr, grad_student_ptr,
    shared_stride, teacher_stride, student_stride, grad_shared_stride, grad_student_stride,
    num_classes, num_sub,
    temperature, label_smoothing, theta, w_gt, w_sdd, w_ol, lam_s, lam_t,
    ACC: tl.constexpr, SUBS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    DETACH_TARGET: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    shared_row = shared_ptr + row * shared_stride
    teacher_row = teacher_ptr + row * teacher_stride
    student_row = student_ptr + row * student_stride
    cols = tl.arange(0, BLOCK)
    subs = tl.arange(0, SUBS)
    is_sub = subs < num_sub
    # Float arguments arrive as fp32; those divided below are widened first.
    temperature = tl.full([], temperature, ACC)
    label_smoothing = tl.full([], label_smoothing, ACC)
    w_gt = tl.full([], w_gt, ACC)
    w_sdd = tl.full([], w_sdd, ACC)
    w_ol = tl.full([], w_ol, ACC)
    inv_temperature = 1.0 / temperature
    target = tl.load(target_ptr + row).to(tl.int32)
    valid_target = (target >= 0) & (target < num_classes)

    # 1. Per-sub-logit statistics: log-sum-exp of F_j and of F_j / T, the KL dot product, the sum
    #    of F_j (label smoothing), and the Gram matrix of the v_j.
    q_max = tl.full([SUBS], NEG_FILL, ACC)
    q_sum = tl.zeros([SUBS], ACC)
    pf_max = tl.full([SUBS], NEG_FILL, ACC)
    pf_sum = tl.zeros([SUBS], ACC)
    pf_dot = tl.zeros([SUBS], ACC)
    fused_sum = tl.zeros([SUBS], ACC)
    gram = tl.zeros([SUBS, SUBS], ACC)
    s_max = tl.full([], NEG_FILL, ACC)
    s_sum = tl.zeros([], ACC)
    if SINGLE_BLOCK:
        in_row, in_tile, fused, student = _load_tile(
            shared_row, teacher_row, student_row, subs, is_sub, cols, num_classes, lam_s, lam_t,
            ACC)
        q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _tile_stats(
            q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum,
            fused, student, in_row, in_tile, cols, target, inv_temperature)
    else:
        for start in range(0, num_classes, BLOCK):
            block_cols = start + cols
            in_row, in_tile, fused, student = _load_tile(
                shared_row, teacher_row, student_row, subs, is_sub, block_cols, num_classes,
                lam_s, lam_t, ACC)
            q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _tile_stats(
                q_max, q_sum, pf_max, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum,
                fused, student, in_row, in_tile, block_cols, target, inv_temperature)

    # 2. The three terms.
    # Padding rows (j >= num_sub) get finite stand-ins so no exp() overflows on them.
    safe_pf_sum = tl.where(is_sub, pf_sum, 1.0)
    q_lse = tl.where(is_sub, q_max + tl.log(tl.where(is_sub, q_sum, 1.0)), 0.0)
    pf_lse = tl.where(is_sub, pf_max + tl.log(safe_pf_sum), 0.0)
    s_lse = s_max + tl.log(s_sum)
    target_shared = tl.load(shared_row + subs * num_classes + target,
                            mask=is_sub & valid_target, other=0.0).to(ACC)
    target_teacher = tl.load(teacher_row + target, mask=valid_target, other=0.0).to(ACC)
    fused_target = lam_s * target_shared + lam_t * target_teacher
    ce = q_lse - (1.0 - label_smoothing) * fused_target - label_smoothing / num_classes * fused_sum
    sce = tl.sum(tl.where(is_sub, ce, 0.0), axis=0) / num_sub
    # An out-of-range label makes the loss NaN instead of reading out of bounds.
    sce = tl.where(valid_target, sce, float("nan"))
    kl = tl.where(is_sub, pf_dot / safe_pf_sum - pf_lse + s_lse, 0.0)
    sdd = temperature * temperature * tl.sum(kl, axis=0) / num_sub

    is_diagonal = subs[:, None] == subs[None, :]
    norm = tl.sqrt(tl.sum(tl.where(is_diagonal, gram, 0.0), axis=1))
    inv_norm = 1.0 / tl.maximum(norm, 1e-12)
    cosines = gram * inv_norm[:, None] * inv_norm[None, :]
    is_pair = is_sub[:, None] & is_sub[None, :] & ~is_diagonal
    excess = tl.where(is_pair, tl.maximum(cosines - theta, 0.0), 0.0)
    num_pairs = tl.maximum(num_sub * (num_sub - 1), 1)
    ol = tl.sum(tl.sum(excess * excess, axis=1), axis=0) / num_pairs

    tl.store(loss_ptr + row, w_gt * sce + w_sdd * sdd + w_ol * ol)
    tl.store(parts_ptr + row * 3 + 0, sce)
    tl.store(parts_ptr + row * 3 + 1, sdd)
    tl.store(parts_ptr + row * 3 + 2, ol)

    # 3. Gradients, tile by tile.
    if COMPUTE_GRAD:
        grad_shared_row = grad_shared_ptr + row * grad_shared_stride
        grad_student_row = grad_student_ptr + row * grad_student_stride
        coupling = (4.0 * w_ol / num_pairs) * excess
        along = tl.sum(coupling * cosines, axis=1)  # u_j . g_j
        ce_scale = w_gt / num_sub
        if SINGLE_BLOCK:
            grad, grad_student = _tile_grads(
                fused, student, in_tile, cols, target, q_lse, pf_lse, s_lse, kl, inv_norm,
                coupling, along, inv_temperature, temperature, ce_scale, label_smoothing,
                num_classes, num_sub, w_sdd, lam_s, DETACH_TARGET)
            tl.store(grad_shared_row + subs[:, None] * num_classes + cols[None, :],
                     grad.to(grad_shared_ptr.dtype.element_ty), mask=in_tile)
            tl.store(grad_student_row + cols, grad_student.to(grad_student_ptr.dtype.element_ty),
                     mask=in_row)
        else:
            for start in range(0, num_classes, BLOCK):
                block_cols = start + cols
                in_row, in_tile, fused, student = _load_tile(
                    shared_row, teacher_row, student_row, subs, is_sub, block_cols, num_classes,
                    lam_s, lam_t, ACC)
                grad, grad_student = _tile_grads(
                    fused, student, in_tile, block_cols, target, q_lse, pf_lse, s_lse, kl,
                    inv_norm, coupling, along, inv_temperature, temperature, ce_scale,
                    label_smoothing, num_classes, num_sub, w_sdd, lam_s, DETACH_TARGET)
                tl.store(grad_shared_row + subs[:, None] * num_classes + block_cols[None, :],
                         grad.to(grad_shared_ptr.dtype.element_ty), mask=in_tile)
                tl.store(grad_student_row + block_cols,
                         grad_student.to(grad_student_ptr.dtype.element_ty), mask=in_row)


def hcd_launch_config(num_classes, block_size=None, num_warps=None):
    """Block width, whether the row fits one tile, and warps, for rows of ``num_classes``.

    Rows wider than one tile stream in blocks of ``STREAM_BLOCK``: at B = 1024, C = 21843 on an
    H200 (bench/tune_kernels.py) 9.0 ms in fp32 and 7.5 ms in bf16, against 25.6 / 21.1 ms for
    1024-wide blocks with 16 warps. (The torch backend still beats both there: see bench/.)
    """
    widest = MAX_TILE // SUB_BLOCK
    block = block_size or (max(triton.next_power_of_2(num_classes), 16)
                           if num_classes <= widest else STREAM_BLOCK)
    num_warps = num_warps or (4 if block <= 256 else 8 if block <= 512 else 16)
    return block, num_classes <= block, num_warps


def hcd_forward(shared_logits, teacher_logits, student_logits, target, *, num_sub, temperature,
                label_smoothing, theta, w_gt, w_sdd, w_ol, lam_s, lam_t, detach_target,
                needs_grad=(True, False, True), block_size=None, num_warps=None):
    """Launch the fused kernel: per-row loss [B], parts [B, 3] (sce, sdd, ol) and the gradients
    w.r.t. the shared and student logits in their dtypes. Inputs are assumed validated."""
    if num_sub > MAX_NUM_SUB:
        raise ValueError(
            f"num_sub must be at most {MAX_NUM_SUB} for the triton backend, got {num_sub}")
    shared_logits, teacher_logits, student_logits = (
        row_major(shared_logits), row_major(teacher_logits), row_major(student_logits))
    batch, num_classes = student_logits.shape
    compute_grad = needs_grad[0] or needs_grad[2]
    dtype = compute_dtype(shared_logits, teacher_logits, student_logits)
    loss, parts, grad_student = row_outputs(student_logits, 3, compute_grad, dtype)
    grad_shared = torch.empty_like(shared_logits) if compute_grad else None
    grad_shared_ptr, grad_shared_stride = optional_output(grad_shared, loss)
    grad_student_ptr, grad_student_stride = optional_output(grad_student, loss)
    block, single_block, num_warps = hcd_launch_config(num_classes, block_size, num_warps)
    _hcd_kernel[(batch,)](
        shared_logits, teacher_logits, student_logits, target, loss, parts,
        grad_shared_ptr, grad_student_ptr,
        shared_logits.stride(0), teacher_logits.stride(0), student_logits.stride(0),
        grad_shared_stride, grad_student_stride,
        num_classes, num_sub,
        float(temperature), float(label_smoothing), float(theta), float(w_gt), float(w_sdd),
        float(w_ol), float(lam_s), float(lam_t),
        ACC=accumulator_dtype(dtype), SUBS=SUB_BLOCK, BLOCK=block,
        SINGLE_BLOCK=single_block, DETACH_TARGET=bool(detach_target), COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )
    return loss, parts, (grad_shared if needs_grad[0] else None, None,
                         grad_student if needs_grad[2] else None)


def hcd_rows(shared_logits, teacher_logits, student_logits, target, **options):
    """Differentiable per-row HCD logit loss ``[B]`` and parts ``[B, 3]`` (sce, sdd, ol);
    ``options`` as ``hcd_forward``'s."""
    return RowLossFunction.apply(functools.partial(hcd_forward, **options), shared_logits,
                                 teacher_logits, student_logits, target)
