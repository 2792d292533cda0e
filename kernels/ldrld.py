"""Fused LDRLD loss (Local Dense Relational Logit Distillation, shared/spec/ldrld.md).

One program per sample. From the student row it selects the top-d classes G = {pi(1..d)} (by
student logit, ties to the lower class index), builds the d x d pair terms with their Adaptive
Decay Weights and the top-set term in registers, streams the remainder R = C \\ G for its softmax,
and writes the per-sample loss, its parts and the gradient w.r.t. the student logits:

    L = ce_weight * CE(zs, y) + alpha * L_local + beta * KL_R
    L_local = T^2 (sum_{i<j} ADW(i, j) KL_{pi(i) pi(j)} + w_G KL_G) / n_groups
    d(k_S T^2 KL_S)/d zs_c = k_S T (ps_S(c) - pt_S(c)) for every group S containing c.

Rows of up to ``MAX_BLOCK`` classes are read once and kept in registers; wider rows are read in
blocks of ``STREAM_BLOCK``: once to select, once for the remainder statistics and once to write
the gradient.
"""

import functools

import torch
import triton
import triton.language as tl

from .autograd import RowLossFunction
from .common import (
    MAX_BLOCK,
    NEG_FILL,
    accumulator_dtype,
    binary_kl,
    compute_dtype,
    empty_kl_stats,
    kl_from_stats,
    launch_config,
    load_block,
    masked_log_softmax,
    online_kl_stats,
    online_logsumexp,
    optional_output,
    row_major,
    row_outputs,
    sigmoid,
)

MAX_TOP_D = 32
# Streamed rows go in blocks of 1024 with 4 warps: at B = 1024, C = 21843 on an H200
# (bench/tune_kernels.py, CUDA-graph replay, loss and gradient) 0.29 ms in fp32 and 0.28 ms in
# bf16, against 0.42 / 0.41 ms for the 4096-wide blocks with 16 warps that rows of up to 4096 use.
STREAM_BLOCK = 1024
# Filler for top-set slots beyond top_d: never the worst member, so never replaced.
POS_FILL = tl.constexpr(1e30)
# Column index of an empty slot: above every real column, so real columns win ties against it.
EMPTY_COL = tl.constexpr(1 << 30)


@triton.jit
def _merge_block_top(values, cols, top_values, top_cols, top_d):
    """Merge one block of student logits into the running top-d set.

    The set is unsorted; order is (value descending, column ascending). While the block still
    holds an element better than the set's worst member, that element replaces it.
    """
    worst = tl.min(top_values, axis=0)
    worst_col = tl.max(tl.where(top_values == worst, top_cols, -1), axis=0)
    better = (values > worst) | ((values == worst) & (cols < worst_col))
    num_better = tl.sum(better.to(tl.int32), axis=0)
    for _ in range(tl.minimum(num_better, top_d)):
        best = tl.max(values, axis=0)
        best_col = tl.min(tl.where(values == best, cols, EMPTY_COL), axis=0)
        worst = tl.min(top_values, axis=0)
        worst_col = tl.max(tl.where(top_values == worst, top_cols, -1), axis=0)
        replaces = (best > worst) | ((best == worst) & (best_col < worst_col))
        # where() rather than `&`: the interpreter cannot `&` a scalar with a block of bools.
        slot = tl.where(replaces, (top_values == worst) & (top_cols == worst_col), False)
        top_values = tl.where(slot, best, top_values)
        top_cols = tl.where(slot, best_col, top_cols)
        values = tl.where(cols == best_col, NEG_FILL, values)
    return top_values, top_cols


@triton.jit
def _in_top_set(values, cols, last_value, last_col):
    """Membership in the top set: at or above its last member in (value desc, column asc)."""
    return (values > last_value) | ((values == last_value) & (cols <= last_col))


@triton.jit
def _ce_grad(logits, cols, logsumexp, target, ce_weight):
    return ce_weight * (tl.exp(logits - logsumexp) - (cols == target).to(logits.dtype))


@triton.jit
def _remainder_grad(student, teacher, cols, rest, target, inv_temperature, s_lse, t_lse,
                    rntk_scale, ce_lse, ce_weight):
    """Gradient at the ``rest`` lanes (classes outside the top set): beta T (ps_R - pt_R) plus the
    CE term. Other lanes get no remainder term (their exponent could overflow)."""
    ps_rest = tl.exp(tl.where(rest, student * inv_temperature - s_lse, NEG_FILL))
    pt_rest = tl.exp(tl.where(rest, teacher * inv_temperature - t_lse, NEG_FILL))
    return rntk_scale * (ps_rest - pt_rest) + _ce_grad(student, cols, ce_lse, target, ce_weight)


@triton.jit
def _ldrld_kernel(
    student_ptr, teacher_ptr, target_ptr, loss_ptr, parts_ptr, grad_ptr,
    student_stride, teacher_stride, grad_stride,
    num_classes, top_d,
    temperature, alpha, beta, ce_weight,
    inv_num_groups, top_set_weight, irw_eps, erd_scale, erd_decay,
    ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    TOP_BLOCK: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    grad_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, TOP_BLOCK)
    is_slot = slots < top_d
    temperature = tl.full([], temperature, ACC)  # float arguments arrive as fp32
    inv_temperature = 1.0 / temperature
    target = tl.load(target_ptr + row).to(tl.int32)

    # 1. Top-d selection by student logit.
    top_values = tl.where(is_slot, NEG_FILL, POS_FILL).to(ACC)
    top_cols = EMPTY_COL + slots
    if SINGLE_BLOCK:
        in_row = cols < num_classes
        student = load_block(student_row, cols, in_row, ACC)
        teacher = load_block(teacher_row, cols, in_row, ACC)
        top_values, top_cols = _merge_block_top(student, cols, top_values, top_cols, top_d)
    else:
        for start in range(0, num_classes, BLOCK):
            block_cols = start + cols
            student = load_block(student_row, block_cols, block_cols < num_classes, ACC)
            top_values, top_cols = _merge_block_top(student, block_cols, top_values, top_cols,
                                                    top_d)
    last_value = tl.min(top_values, axis=0)
    last_col = tl.max(tl.where(top_values == last_value, top_cols, -1), axis=0)

    # 2. Remainder softmax statistics (summed directly, never as "all minus top") and the
    #    full-row log-sum-exp for the cross-entropy.
    t_max, t_sum, t_dot, s_max, s_sum = empty_kl_stats(ACC)
    ce_max = tl.full([], NEG_FILL, ACC)
    ce_sum = tl.zeros([], ACC)
    if SINGLE_BLOCK:
        rest = in_row & ~_in_top_set(student, cols, last_value, last_col)
        t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
            t_max, t_sum, t_dot, s_max, s_sum,
            teacher * inv_temperature, student * inv_temperature, rest)
        ce_max, ce_sum = online_logsumexp(ce_max, ce_sum, student, in_row)
    else:
        for start in range(0, num_classes, BLOCK):
            block_cols = start + cols
            in_row = block_cols < num_classes
            student = load_block(student_row, block_cols, in_row, ACC)
            teacher = load_block(teacher_row, block_cols, in_row, ACC)
            rest = in_row & ~_in_top_set(student, block_cols, last_value, last_col)
            t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
                t_max, t_sum, t_dot, s_max, s_sum,
                teacher * inv_temperature, student * inv_temperature, rest)
            ce_max, ce_sum = online_logsumexp(ce_max, ce_sum, student, in_row)
    rntk, t_lse, s_lse = kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum)
    rntk = temperature * temperature * rntk
    ce_lse = ce_max + tl.log(ce_sum)

    # 3. Pair and top-set terms on the d slots, in registers.
    top_logits = tl.where(is_slot, top_values, NEG_FILL)  # empty slots would overflow exp()
    top_student = top_logits * inv_temperature
    top_teacher = load_block(teacher_row, top_cols, is_slot, ACC) * inv_temperature

    # 1-based rank of each slot = 1 + number of set members ahead of it.
    value_p = top_values[:, None]
    value_q = top_values[None, :]
    ahead = (value_q > value_p) | ((value_q == value_p) & (top_cols[None, :] < top_cols[:, None]))
    rank = (tl.sum((ahead & is_slot[None, :]).to(tl.int32), axis=1) + 1).to(ACC)
    rank_p = rank[:, None]
    rank_q = rank[None, :]
    adw = erd_scale * tl.exp(-erd_decay * (rank_p + rank_q)) / (tl.abs(rank_p - rank_q) + irw_eps)
    is_pair = is_slot[:, None] & is_slot[None, :] & (slots[:, None] != slots[None, :])

    teacher_gaps = top_teacher[:, None] - top_teacher[None, :]
    student_gaps = top_student[:, None] - top_student[None, :]
    pair_kl = binary_kl(teacher_gaps, student_gaps)
    # Each unordered pair appears twice in the d x d matrix.
    pair_sum = 0.5 * tl.sum(tl.sum(tl.where(is_pair, adw * pair_kl, 0.0), axis=1), axis=0)
    pair_prob_gap = sigmoid(student_gaps) - sigmoid(teacher_gaps)
    pair_grad = tl.sum(tl.where(is_pair, adw * pair_prob_gap, 0.0), axis=1)

    log_ps_top = masked_log_softmax(top_student, is_slot)
    log_pt_top = masked_log_softmax(top_teacher, is_slot)
    pt_top = tl.exp(log_pt_top)
    top_set_kl = tl.sum(tl.where(is_slot, pt_top * (log_pt_top - log_ps_top), 0.0), axis=0)

    local = temperature * temperature * inv_num_groups * (pair_sum + top_set_weight * top_set_kl)

    valid_target = (target >= 0) & (target < num_classes)
    target_logit = tl.load(student_row + target, mask=valid_target, other=0.0).to(ACC)
    # An out-of-range label makes the loss NaN instead of reading out of bounds.
    ce = tl.where(valid_target, ce_lse - target_logit, float("nan"))

    tl.store(loss_ptr + row, ce_weight * ce + alpha * local + beta * rntk)
    tl.store(parts_ptr + row * 3 + 0, ce)
    tl.store(parts_ptr + row * 3 + 1, local)
    tl.store(parts_ptr + row * 3 + 2, rntk)

    # 4. Gradient: remainder classes block by block, then the d top-set slots.
    if COMPUTE_GRAD:
        rntk_scale = beta * temperature
        if SINGLE_BLOCK:
            grad = _remainder_grad(student, teacher, cols, rest, target, inv_temperature, s_lse,
                                   t_lse, rntk_scale, ce_lse, ce_weight)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=rest)
        else:
            for start in range(0, num_classes, BLOCK):
                block_cols = start + cols
                in_row = block_cols < num_classes
                student = load_block(student_row, block_cols, in_row, ACC)
                teacher = load_block(teacher_row, block_cols, in_row, ACC)
                rest = in_row & ~_in_top_set(student, block_cols, last_value, last_col)
                grad = _remainder_grad(student, teacher, block_cols, rest, target, inv_temperature,
                                       s_lse, t_lse, rntk_scale, ce_lse, ce_weight)
                tl.store(grad_row + block_cols, grad.to(grad_ptr.dtype.element_ty), mask=rest)
        top_set_grad = tl.exp(log_ps_top) - pt_top
        local_grad = (alpha * temperature * inv_num_groups
                      * (pair_grad + top_set_weight * top_set_grad))
        top_grad = local_grad + _ce_grad(top_logits, top_cols, ce_lse, target, ce_weight)
        tl.store(grad_row + top_cols, top_grad.to(grad_ptr.dtype.element_ty), mask=is_slot)


def ldrld_launch_config(num_classes, block_size=None, num_warps=None):
    """``launch_config``, with rows wider than one block streamed in ``STREAM_BLOCK`` columns."""
    if block_size is None and num_classes > MAX_BLOCK:
        block_size = STREAM_BLOCK
    return launch_config(num_classes, block_size, num_warps)


def ldrld_forward(student_logits, teacher_logits, target, *, temperature, top_d, alpha, beta,
                  ce_weight, irw_eps, erd_scale, erd_decay, top_set_weight, num_groups,
                  needs_grad=(True,), block_size=None, num_warps=None):
    """Launch the fused kernel: per-row loss [B], parts [B, 3] (ce, local, rntk) and, when
    ``needs_grad``, the gradient [B, C] in the student logits' dtype. ``target`` may be None when
    ``ce_weight`` is 0; the ce column then holds no meaning. Inputs are assumed validated."""
    if top_d > MAX_TOP_D:
        raise ValueError(f"top_d must be at most {MAX_TOP_D} for the triton backend, got {top_d}")
    student_logits = row_major(student_logits)
    teacher_logits = row_major(teacher_logits)
    batch, num_classes = student_logits.shape
    if target is None:
        # Class 0 stands in for the missing labels: times ce_weight = 0, its CE adds exactly 0
        # to the loss and to the gradient.
        target = torch.zeros(batch, dtype=torch.int64, device=student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    loss, parts, grad = row_outputs(student_logits, 3, needs_grad[0], dtype)
    grad_ptr, grad_stride = optional_output(grad, loss)
    block, single_block, num_warps = ldrld_launch_config(num_classes, block_size, num_warps)
    _ldrld_kernel[(batch,)](
        student_logits, teacher_logits, target, loss, parts, grad_ptr,
        student_logits.stride(0), teacher_logits.stride(0), grad_stride,
        num_classes, top_d,
        float(temperature), float(alpha), float(beta), float(ce_weight),
        1.0 / num_groups, float(top_set_weight), float(irw_eps), float(erd_scale),
        float(erd_decay),
        ACC=accumulator_dtype(dtype), BLOCK=block, SINGLE_BLOCK=single_block,
        TOP_BLOCK=max(triton.next_power_of_2(top_d), 2), COMPUTE_GRAD=grad is not None,
        num_warps=num_warps,
    )
    return loss, parts, (grad,)


def ldrld_rows(student_logits, teacher_logits, target, **options):
    """Differentiable per-row LDRLD loss ``[B]`` and its parts ``[B, 3]`` (ce, local, rntk);
    ``options`` as ``ldrld_forward``'s."""
    return RowLossFunction.apply(functools.partial(ldrld_forward, **options), student_logits,
                                 teacher_logits, target)
