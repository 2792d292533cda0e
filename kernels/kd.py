"""Fused Hinton KD and Decoupled KD (Zhao et al., CVPR 2022) losses.

One program per sample; it streams the row's softmax statistics, then writes the loss and the
gradient w.r.t. the student logits (s = zs / T, t = zt / T):

    KD:   L = T^2 KL(softmax(t) || softmax(s)),             dL/dzs_c = T (ps_c - pt_c)
    DKD:  L = alpha TCKD + beta NCKD with the binary split b = (p_y, p_rest) and the non-target
          softmax q over c != y:
          dTCKD/dzs_y = T (ps_y - pt_y),  dTCKD/dzs_c = T qs_c (ps_rest - pt_rest)  (c != y)
          dNCKD/dzs_c = T (qs_c - qt_c)  (c != y),  0 at y.
"""

import triton
import triton.language as tl

from .common import (
    above_neg_fill,
    accumulator_dtype,
    binary_kl,
    compute_dtype,
    empty_kl_stats,
    kl_from_stats,
    launch_config,
    load_block,
    load_blocks,
    online_kl_stats,
    optional_output,
    row_major,
    row_outputs,
    row_prologue,
    sigmoid,
    store_block,
)


@triton.jit
def _load_scaled(student_row, teacher_row, block_cols, num_classes, inv_temperature,
                 ACC: tl.constexpr):
    """One block's lanes inside the row and its student and teacher logits / T (s and t)."""
    in_row, student, teacher = load_blocks(student_row, teacher_row, block_cols, num_classes, ACC)
    return in_row, student * inv_temperature, teacher * inv_temperature


@triton.jit
def _store_kd_grad(grad_row, block_cols, in_row, student, teacher, s_lse, t_lse, temperature):
    """dL/dzs = T (ps - pt) at one block of classes (student, teacher already / T)."""
    grad = temperature * (tl.exp(student - s_lse) - tl.exp(teacher - t_lse))
    store_block(grad_row, block_cols, grad, in_row)


@triton.jit
def _kd_kernel(
    student_ptr, teacher_ptr, loss_ptr, grad_ptr,
    student_stride, teacher_stride, grad_stride, num_classes, temperature,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row, student_row, teacher_row, grad_row, cols, temperature, inv_temperature = row_prologue(
        student_ptr, teacher_ptr, grad_ptr, student_stride, teacher_stride, grad_stride,
        temperature, BLOCK, ACC)

    t_max, t_sum, t_dot, s_max, s_sum = empty_kl_stats(ACC)
    if SINGLE_BLOCK:
        in_row, student, teacher = _load_scaled(student_row, teacher_row, cols, num_classes,
                                                inv_temperature, ACC)
        t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
            t_max, t_sum, t_dot, s_max, s_sum, teacher, student, in_row)
    else:
        for start in range(0, num_classes, BLOCK):
            in_row, student, teacher = _load_scaled(student_row, teacher_row, start + cols,
                                                    num_classes, inv_temperature, ACC)
            t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
                t_max, t_sum, t_dot, s_max, s_sum, teacher, student, in_row)
    kl, t_lse, s_lse = kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum)
    tl.store(loss_ptr + row, temperature * temperature * kl)

    if COMPUTE_GRAD:
        if SINGLE_BLOCK:
            _store_kd_grad(grad_row, cols, in_row, student, teacher, s_lse, t_lse, temperature)
        else:
            for start in range(0, num_classes, BLOCK):
                in_row, student, teacher = _load_scaled(student_row, teacher_row, start + cols,
                                                        num_classes, inv_temperature, ACC)
                _store_kd_grad(grad_row, start + cols, in_row, student, teacher, s_lse, t_lse,
                               temperature)


@triton.jit
def _store_dkd_grad(grad_row, block_cols, in_row, student, teacher, target, temperature,
                    s_rest_lse, t_rest_lse, target_prob_gap, alpha, beta):
    """Gradient of alpha TCKD + beta NCKD at one block of classes (student, teacher already / T);
    ``target_prob_gap = ps_y - pt_y``, so ps_rest - pt_rest is its negative."""
    qs = tl.exp(student - s_rest_lse)
    qt = tl.exp(teacher - t_rest_lse)
    non_target = temperature * (beta * (qs - qt) - alpha * qs * target_prob_gap)
    grad = tl.where(block_cols == target, alpha * temperature * target_prob_gap, non_target)
    store_block(grad_row, block_cols, grad, in_row)


@triton.jit
def _dkd_kernel(
    student_ptr, teacher_ptr, target_ptr, loss_ptr, parts_ptr, grad_ptr,
    student_stride, teacher_stride, grad_stride, num_classes, alpha, beta, temperature,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row, student_row, teacher_row, grad_row, cols, temperature, inv_temperature = row_prologue(
        student_ptr, teacher_ptr, grad_ptr, student_stride, teacher_stride, grad_stride,
        temperature, BLOCK, ACC)
    target = tl.load(target_ptr + row).to(tl.int32)
    valid_target = (target >= 0) & (target < num_classes)

    # Non-target softmax statistics, summed over c != y directly.
    t_max, t_sum, t_dot, s_max, s_sum = empty_kl_stats(ACC)
    if SINGLE_BLOCK:
        in_row, student, teacher = _load_scaled(student_row, teacher_row, cols, num_classes,
                                                inv_temperature, ACC)
        t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
            t_max, t_sum, t_dot, s_max, s_sum, teacher, student, in_row & (cols != target))
    else:
        for start in range(0, num_classes, BLOCK):
            in_row, student, teacher = _load_scaled(student_row, teacher_row, start + cols,
                                                    num_classes, inv_temperature, ACC)
            t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
                t_max, t_sum, t_dot, s_max, s_sum, teacher, student,
                in_row & (start + cols != target))
    nckd, t_rest_lse, s_rest_lse = kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum)

    # The binary (target, rest) split is a two-class softmax over (s_y, lse_rest(s)): its KL
    # depends only on the gap g = s_y - lse_rest, never on 1 - p_y.
    s_target = load_block(student_row, target, valid_target, ACC) * inv_temperature
    t_target = load_block(teacher_row, target, valid_target, ACC) * inv_temperature
    s_gap = s_target - s_rest_lse
    # A masked target or rest (-inf) makes the teacher's gap infinite: kept finite, both ways.
    t_gap = -above_neg_fill(-above_neg_fill(t_target - t_rest_lse))
    tckd = binary_kl(t_gap, s_gap)
    squared = temperature * temperature
    # An out-of-range label makes the loss NaN instead of reading out of bounds.
    tckd = tl.where(valid_target, squared * tckd, float("nan"))
    nckd = squared * nckd
    tl.store(loss_ptr + row, alpha * tckd + beta * nckd)
    tl.store(parts_ptr + row * 2 + 0, tckd)
    tl.store(parts_ptr + row * 2 + 1, nckd)

    if COMPUTE_GRAD:
        target_prob_gap = sigmoid(s_gap) - sigmoid(t_gap)
        if SINGLE_BLOCK:
            _store_dkd_grad(grad_row, cols, in_row, student, teacher, target, temperature,
                            s_rest_lse, t_rest_lse, target_prob_gap, alpha, beta)
        else:
            for start in range(0, num_classes, BLOCK):
                in_row, student, teacher = _load_scaled(student_row, teacher_row, start + cols,
                                                        num_classes, inv_temperature, ACC)
                _store_dkd_grad(grad_row, start + cols, in_row, student, teacher, target,
                                temperature, s_rest_lse, t_rest_lse, target_prob_gap, alpha, beta)


def _launch_settings(student_logits, teacher_logits, num_parts, needs_grad, block_size,
                     num_warps):
    """What the KD and DKD launchers share: the logits row-major, the outputs ``(loss [B], parts
    [B, num_parts], gradient or None)``, the gradient's pointer and row stride, and the kernel's
    compile-time settings."""
    student_logits, teacher_logits = row_major(student_logits), row_major(teacher_logits)
    dtype = compute_dtype(student_logits, teacher_logits)
    loss, parts, grad = row_outputs(student_logits, num_parts, needs_grad[0], dtype)
    block, single_block, num_warps = launch_config(student_logits.shape[1], block_size,
                                                     num_warps)
    settings = dict(ACC=accumulator_dtype(dtype), BLOCK=block, SINGLE_BLOCK=single_block,
                    COMPUTE_GRAD=grad is not None, num_warps=num_warps)
    return (student_logits, teacher_logits, (loss, parts, grad), optional_output(grad, loss),
            settings)


def kd_forward(student_logits, teacher_logits, target, *, temperature, needs_grad=(True,),
               block_size=None, num_warps=None):
    """Launch the KD kernel: loss [B], no parts ([B, 0]), gradient [B, C] in the student logits'
    dtype if ``needs_grad``. ``target`` is unused (KD needs no labels); it keeps the launchers'
    common signature."""
    student_logits, teacher_logits, (loss, parts, grad), (grad_ptr, grad_stride), settings = (
        _launch_settings(student_logits, teacher_logits, 0, needs_grad, block_size, num_warps))
    _kd_kernel[(student_logits.shape[0],)](
        student_logits, teacher_logits, loss, grad_ptr,
        student_logits.stride(0), teacher_logits.stride(0), grad_stride,
        student_logits.shape[1], float(temperature), **settings,
    )
    return loss, parts, (grad,)


def dkd_forward(student_logits, teacher_logits, target, *, alpha, beta, temperature,
                needs_grad=(True,), block_size=None, num_warps=None):
    """Launch the DKD kernel: loss [B], parts [B, 2] (tckd, nckd), gradient [B, C] in the student
    logits' dtype."""
    student_logits, teacher_logits, (loss, parts, grad), (grad_ptr, grad_stride), settings = (
        _launch_settings(student_logits, teacher_logits, 2, needs_grad, block_size, num_warps))
    _dkd_kernel[(student_logits.shape[0],)](
        student_logits, teacher_logits, target, loss, parts, grad_ptr,
        student_logits.stride(0), teacher_logits.stride(0), grad_stride,
        student_logits.shape[1], float(alpha), float(beta), float(temperature), **settings,
    )
    return loss, parts, (grad,)
