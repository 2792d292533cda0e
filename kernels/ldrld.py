"""Fused LDRLD loss (Local Dense Relational Logit Distillation, shared/spec/ldrld.md).

One program per sample. From the student row it selects the top-d classes G = {pi(1..d)} (by
student logit, ties to the lower class index), builds the d x d pair terms with their Adaptive
Decay Weights and the top-set term in registers, streams the remainder R = C \\ G for its softmax,
and writes the per-sample loss, its parts and the gradient w.r.t. the student logits:

    L = ce_weight * CE(zs, y) + alpha * L_local + beta * KL_R
    L_local = T^2 (sum_{i<j} ADW(i, j) KL_{pi(i) pi(j)} + w_G KL_G) / n_groups
    d(k_S T^2 KL_S)/d zs_c = k_S T (ps_S(c) - pt_S(c)) for every group S containing c.

Rows of up to ``MAX_BLOCK`` classes are read once and kept in registers; wider rows are read in
blocks of ``STREAM_BLOCK`` twice: once to select the top set and sum the remainder's and the CE
term's softmax statistics together (``_merge_block``, ``_fold_block_rest``), once to write the
gradient (``_store_remainder_grad``).
"""

import functools

import torch
import triton
import triton.language as tl

from .common import (
    MAX_BLOCK,
    NEG_FILL,
    above_neg_fill,
    accumulator_dtype,
    binary_kl,
    compute_dtype,
    empty_kl_stats,
    empty_lane_kl_stats,
    kl_from_stats,
    kl_term,
    lane_kl_stats,
    launch_config,
    load_blocks,
    masked_log_softmax,
    merge_kl_stats,
    online_kl_stats,
    optional_output,
    reduce_lane_kl_stats,
    row_major,
    row_outputs,
    row_prologue,
    sigmoid,
    store_block,
    store_three_part_loss,
)

MAX_TOP_D = 32
# Streamed rows go in blocks of 1024 with 4 warps: at B = 1024, C = 21843 on an H200
# (bench/tune_kernels.py, CUDA-graph replay, loss and gradient) 0.29 ms in fp32 and 0.28 ms in
# bf16, against 0.42 / 0.41 ms for the 4096-wide blocks with 16 warps that rows of up to 4096 use.
# (Measured on the three-pass kernel that preceded the fused selection of issue 14.)
STREAM_BLOCK = 1024
# Filler for top-set slots beyond top_d: never the worst member, so never replaced.
POS_FILL = tl.constexpr(1e30)
# Column index of an empty slot: above every real column, so real columns win ties against it.
EMPTY_COL = tl.constexpr(1 << 30)


@triton.jit
def _last_member(top_values, top_cols):
    """Value and column of the set's last member in (value descending, column ascending) order:
    the one a better element replaces. Two reductions over the TOP_BLOCK slots."""
    last_value = tl.min(top_values, axis=0)
    last_col = tl.max(tl.where(top_values == last_value, top_cols, -1), axis=0)
    return last_value, last_col


@triton.jit
def _merge_block(student, block_max, lanes, start, teacher_row, top_values, top_cols,
                 top_teacher, last_value, last_col, t_max, t_sum, t_dot, s_max, s_sum,
                 inv_temperature):
    """Merge one block of student logits (columns ``start + lanes``, maximum ``block_max``) into
    the running top-d set.

    The set is unsorted: slot k holds a student logit, its column and its teacher logit; the
    order is (value descending, column ascending) and ``(last_value, last_col)`` is its last
    member. Blocks arrive in column order, so an element of this block ties with an earlier
    member only to lose: it enters iff its value is strictly above ``last_value``, and the
    block's elements are taken best first (``tl.max`` with indices returns the lowest lane of
    equal values). A replaced member that was a real class (not an empty slot's filler) joins
    the remainder there and then: its slot's per-slot statistics ``(t_max, ..., s_sum)`` fold in
    its teacher and student logits / T (``lane_kl_stats``).

    Cost on a GPU: a block with nothing to insert (most blocks once the set has settled) costs
    nothing here beyond ``block_max``, which the caller shares with the CE log-sum-exp. Each
    inserted element costs one argmax over the block (value and index in one reduction tree),
    two reductions over the TOP_BLOCK slots, a few exps on the slots and one scalar load of its
    teacher logit (a line this program has just read). The merge it replaces cost a counting
    reduction per block, then per inserted element a max and an index-of-max over the block and
    two slot reductions, repeated min(count, d) times even when later candidates no longer beat
    the set.
    """
    if block_max > last_value:
        best, best_lane = tl.max(student, axis=0, return_indices=True)
        while best > last_value:
            slot = top_cols == last_col
            # The replaced member leaves the set: empty slots hold columns >= EMPTY_COL.
            evicted = slot & (top_cols < EMPTY_COL)
            t_max, t_sum, t_dot, s_max, s_sum = lane_kl_stats(
                t_max, t_sum, t_dot, s_max, s_sum, top_teacher * inv_temperature,
                top_values * inv_temperature, evicted)
            best_col = start + best_lane
            top_values = tl.where(slot, best, top_values)
            top_cols = tl.where(slot, best_col, top_cols)
            top_teacher = tl.where(slot, tl.load(teacher_row + best_col).to(top_teacher.dtype),
                                   top_teacher)
            last_value, last_col = _last_member(top_values, top_cols)
            student = tl.where(lanes == best_lane, NEG_FILL, student)
            best, best_lane = tl.max(student, axis=0, return_indices=True)
    return (top_values, top_cols, top_teacher, last_value, last_col,
            t_max, t_sum, t_dot, s_max, s_sum)


@triton.jit
def _in_top_set(values, cols, last_value, last_col):
    """Membership in the top set: at or above its last member in (value desc, column asc)."""
    return (values > last_value) | ((values == last_value) & (cols <= last_col))


@triton.jit
def _fold_block_rest(student, teacher, in_row, block_cols, block_max, last_value, last_col,
                     t_max, t_sum, t_dot, s_max, s_sum, ce_max, ce_sums, inv_temperature):
    """After a streamed block's merge, fold its classes outside the top set into the per-lane
    remainder statistics (``lane_kl_stats``: no cross-lane reduction), and every class of it into
    the CE term's log-sum-exp: a scalar running max (the block max, already reduced for the
    merge) with per-lane sums ``ce_sums``. A class the set still holds is counted later if it is
    evicted, never now: each class is added exactly once and nothing is ever subtracted.

    The remainder needs a max per lane, not the block max: a top-set member can sit far above
    the remainder (exp would underflow to an empty sum). The CE term covers every class, so its
    running max is the true one and a scalar suffices; one vector of sums instead of two keeps
    the streamed kernel at 128 registers (fp32, 4 warps: 4 programs per SM).
    """
    rest = in_row & ~_in_top_set(student, block_cols, last_value, last_col)
    t_max, t_sum, t_dot, s_max, s_sum = lane_kl_stats(
        t_max, t_sum, t_dot, s_max, s_sum, teacher * inv_temperature, student * inv_temperature,
        rest)
    new_ce_max = tl.maximum(ce_max, block_max)
    # Lanes past the row hold NEG_FILL: their exp is 0.
    ce_sums = ce_sums * tl.exp(ce_max - new_ce_max) + tl.exp(student - new_ce_max)
    return t_max, t_sum, t_dot, s_max, s_sum, new_ce_max, ce_sums


@triton.jit
def _ce_grad(logits, cols, logsumexp, target, ce_weight):
    return ce_weight * (tl.exp(logits - logsumexp) - (cols == target).to(logits.dtype))


@triton.jit
def _store_remainder_grad(grad_row, student, teacher, in_row, block_cols, last_value, last_col,
                          target, inv_temperature, s_lse, t_lse, rntk_scale, ce_lse, ce_weight):
    """Gradient at one block's classes outside the top set: beta T (ps_R - pt_R) plus the CE
    term. Top-set lanes are neither computed (their exponent could overflow) nor stored."""
    rest = in_row & ~_in_top_set(student, block_cols, last_value, last_col)
    ps_rest = tl.exp(tl.where(rest, student * inv_temperature - s_lse, NEG_FILL))
    pt_rest = tl.exp(tl.where(rest, teacher * inv_temperature - t_lse, NEG_FILL))
    grad = rntk_scale * (ps_rest - pt_rest) + _ce_grad(student, block_cols, ce_lse, target,
                                                       ce_weight)
    store_block(grad_row, block_cols, grad, rest)


@triton.jit
def _join_remainder(t_max, t_sum, t_dot, s_max, s_sum,
                    evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum):
    """The remainder's statistics: classes left outside the set as their block was read (per
    lane) plus members evicted later (per slot), each reduced once, then joined."""
    t_max, t_sum, t_dot, s_max, s_sum = reduce_lane_kl_stats(t_max, t_sum, t_dot, s_max, s_sum)
    evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum = (
        reduce_lane_kl_stats(evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max,
                             evicted_s_sum))
    return merge_kl_stats(t_max, t_sum, t_dot, s_max, s_sum, evicted_t_max, evicted_t_sum,
                          evicted_t_dot, evicted_s_max, evicted_s_sum)


@triton.jit
def _local_term(top_logits, top_values, top_cols, top_teacher, slots, is_slot, inv_temperature,
                temperature, inv_num_groups, top_set_weight, irw_eps, erd_scale, erd_decay,
                ACC: tl.constexpr):
    """L_local = (sum_{i<j<=d} ADW(i, j) KL_{pi(i), pi(j)} + w_G KL_G) / groups, times T^2, on
    the d slots in registers; with what its gradient reuses (each slot's summed pair gradient,
    and the top set's student log-softmax and teacher softmax)."""
    top_student = top_logits * inv_temperature
    # A masked teacher class (-inf) at NEG_FILL: its pairs' teacher gaps stay finite.
    top_teacher = above_neg_fill(top_teacher) * inv_temperature
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
    top_set_kl = tl.sum(tl.where(is_slot, kl_term(log_pt_top, log_ps_top), 0.0), axis=0)
    local = temperature * temperature * inv_num_groups * (pair_sum + top_set_weight * top_set_kl)
    return local, pair_grad, log_ps_top, pt_top


@triton.jit
def _empty_top_set(slots, is_slot, TOP_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The top set before any class is read: each slot's student logit, column and teacher logit,
    and the set's last member (``_last_member``).

    Empty slots get NEG_FILL as masked and taken block lanes do (a Python float against an ACC
    tensor): equal to them, so the merge's strict ">" never inserts one. (A fill made in fp32 and
    widened, -1.0000000150e30 in fp64, sits below the lanes' -1e30 and let them in.) Slots beyond
    top_d hold POS_FILL and EMPTY_COL + slot."""
    top_values = tl.where(is_slot, NEG_FILL, tl.full([TOP_BLOCK], POS_FILL, ACC))
    top_cols = EMPTY_COL + slots
    top_teacher = tl.full([TOP_BLOCK], NEG_FILL, ACC)
    last_value, last_col = _last_member(top_values, top_cols)
    return top_values, top_cols, top_teacher, last_value, last_col


@triton.jit
def _select_in_one_block(student, teacher, in_row, cols, teacher_row, top_values, top_cols,
                         top_teacher, last_value, last_col, temperature, inv_temperature,
                         TOP_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 on a row held in one block (``student``, ``teacher``), from the empty top set
    (``_empty_top_set``): the top set G = {pi(1..d)} by student logit (``_merge_block``),
    L_rntk = T^2 KL(pt_R || ps_R) over the remainder R = C \\ G with its log-sum-exps
    lse(zt_R / T) and lse(zs_R / T), and lse(zs) over the whole row for the CE term. Returns the
    set (values, columns, teacher logits, last member), then L_rntk, lse(zt_R / T),
    lse(zs_R / T) and lse(zs)."""
    evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum = (
        empty_lane_kl_stats(TOP_BLOCK, ACC))
    block_max = tl.max(student, axis=0)
    (top_values, top_cols, top_teacher, last_value, last_col, evicted_t_max, evicted_t_sum,
     evicted_t_dot, evicted_s_max, evicted_s_sum) = _merge_block(
        student, block_max, cols, 0, teacher_row, top_values, top_cols, top_teacher,
        last_value, last_col, evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max,
        evicted_s_sum, inv_temperature)
    # The set started empty and took the block best first: nothing real was evicted, and the
    # evicted statistics are left unread. With one block, per-lane statistics would save no
    # reduction and cost registers (88 instead of 64 at C = 4096, 16 warps: one program per SM
    # instead of two).
    t_max, t_sum, t_dot, s_max, s_sum = empty_kl_stats(ACC)
    t_max, t_sum, t_dot, s_max, s_sum = online_kl_stats(
        t_max, t_sum, t_dot, s_max, s_sum, teacher * inv_temperature,
        student * inv_temperature, in_row & ~_in_top_set(student, cols, last_value, last_col))
    ce_sum = tl.sum(tl.exp(student - block_max), axis=0)
    remainder_kl, t_lse, s_lse = kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum)
    rntk = temperature * temperature * remainder_kl
    return (top_values, top_cols, top_teacher, last_value, last_col, rntk, t_lse, s_lse,
            block_max + tl.log(ce_sum))


@triton.jit
def _select_streamed(student_row, teacher_row, cols, num_classes, top_values, top_cols,
                     top_teacher, last_value, last_col, temperature, inv_temperature,
                     BLOCK: tl.constexpr, TOP_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 over a row read in blocks of BLOCK columns, from the empty top set: what
    ``_select_in_one_block`` returns (G, L_rntk, lse(zt_R / T), lse(zs_R / T), lse(zs)). Each
    block is merged into the set (``_merge_block``), then its classes outside the set join the
    per-lane remainder statistics and all of them the CE term's (``_fold_block_rest``); members
    evicted later join per-slot statistics, and the two are joined at the end
    (``_join_remainder``)."""
    evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum = (
        empty_lane_kl_stats(TOP_BLOCK, ACC))
    t_max, t_sum, t_dot, s_max, s_sum = empty_lane_kl_stats(BLOCK, ACC)
    ce_max = tl.full([], NEG_FILL, ACC)
    ce_sums = tl.zeros([BLOCK], ACC)
    for start in range(0, num_classes, BLOCK):
        in_row, student, teacher = load_blocks(student_row, teacher_row, start + cols,
                                               num_classes, ACC)
        # The block's one cross-lane reduction: the merge's prefilter and the CE's shift.
        block_max = tl.max(student, axis=0)
        (top_values, top_cols, top_teacher, last_value, last_col, evicted_t_max,
         evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum) = _merge_block(
            student, block_max, cols, start, teacher_row, top_values, top_cols, top_teacher,
            last_value, last_col, evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max,
            evicted_s_sum, inv_temperature)
        t_max, t_sum, t_dot, s_max, s_sum, ce_max, ce_sums = _fold_block_rest(
            student, teacher, in_row, start + cols, block_max, last_value, last_col,
            t_max, t_sum, t_dot, s_max, s_sum, ce_max, ce_sums, inv_temperature)
    t_max, t_sum, t_dot, s_max, s_sum = _join_remainder(
        t_max, t_sum, t_dot, s_max, s_sum,
        evicted_t_max, evicted_t_sum, evicted_t_dot, evicted_s_max, evicted_s_sum)
    ce_sum = tl.sum(ce_sums, axis=0)
    remainder_kl, t_lse, s_lse = kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum)
    rntk = temperature * temperature * remainder_kl
    return (top_values, top_cols, top_teacher, last_value, last_col, rntk, t_lse, s_lse,
            ce_max + tl.log(ce_sum))


@triton.jit
def _cross_entropy(student_row, target, num_classes, ce_lse, ACC: tl.constexpr):
    """CE(zs, y) = lse(zs) - zs_y; NaN for an out-of-range label instead of reading out of
    bounds."""
    valid_target = (target >= 0) & (target < num_classes)
    target_logit = tl.load(student_row + target, mask=valid_target, other=0.0).to(ACC)
    return tl.where(valid_target, ce_lse - target_logit, float("nan"))


@triton.jit
def _stream_remainder_grad(grad_row, student_row, teacher_row, cols, num_classes, last_value,
                           last_col, target, inv_temperature, s_lse, t_lse, rntk_scale, ce_lse,
                           ce_weight, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``_store_remainder_grad`` block by block: the streamed row's second read."""
    for start in range(0, num_classes, BLOCK):
        in_row, student, teacher = load_blocks(student_row, teacher_row, start + cols,
                                               num_classes, ACC)
        _store_remainder_grad(grad_row, student, teacher, in_row, start + cols, last_value,
                              last_col, target, inv_temperature, s_lse, t_lse, rntk_scale,
                              ce_lse, ce_weight)


@triton.jit
def _store_top_set_grad(grad_row, top_logits, top_cols, is_slot, num_classes, pair_grad,
                        log_ps_top, pt_top, target, alpha, temperature, inv_num_groups,
                        top_set_weight, ce_lse, ce_weight):
    """Gradient at the top-set class pi(i), from ``_local_term``'s parts: the CE term plus
    alpha T / n_groups (sum_j ADW(i, j) (sigma((zs_pi(i) - zs_pi(j)) / T) - sigma((zt_pi(i) -
    zt_pi(j)) / T)) + w_G (ps_G(pi(i)) - pt_G(pi(i))))."""
    top_set_grad = tl.exp(log_ps_top) - pt_top
    local_grad = (alpha * temperature * inv_num_groups
                  * (pair_grad + top_set_weight * top_set_grad))
    top_grad = local_grad + _ce_grad(top_logits, top_cols, ce_lse, target, ce_weight)
    # A slot no class entered (only if logits are NaN) keeps its EMPTY_COL column: skip it
    # rather than write 2^30 elements past the row.
    store_block(grad_row, top_cols, top_grad, is_slot & (top_cols < num_classes))


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
    """One program per sample: its loss, parts and (COMPUTE_GRAD) gradient, in three phases."""
    row, student_row, teacher_row, grad_row, cols, temperature, inv_temperature = row_prologue(
        student_ptr, teacher_ptr, grad_ptr, student_stride, teacher_stride, grad_stride,
        temperature, BLOCK, ACC)
    slots = tl.arange(0, TOP_BLOCK)
    is_slot = slots < top_d
    target = tl.load(target_ptr + row).to(tl.int32)

    # 1. One pass over the row: top-d selection by student logit, the remainder's softmax
    #    statistics and the full-row log-sum-exp of the CE term. Remainder classes are summed
    #    directly (never as "all minus top"): a block's classes outside the set as the block is
    #    read, a set member when it is evicted.
    top_values, top_cols, top_teacher, last_value, last_col = _empty_top_set(
        slots, is_slot, TOP_BLOCK, ACC)
    if SINGLE_BLOCK:  # the block stays in registers for the gradient
        in_row, student, teacher = load_blocks(student_row, teacher_row, cols, num_classes, ACC)
        top_values, top_cols, top_teacher, last_value, last_col, rntk, t_lse, s_lse, ce_lse = (
            _select_in_one_block(student, teacher, in_row, cols, teacher_row, top_values,
                                 top_cols, top_teacher, last_value, last_col, temperature,
                                 inv_temperature, TOP_BLOCK, ACC))
    else:
        top_values, top_cols, top_teacher, last_value, last_col, rntk, t_lse, s_lse, ce_lse = (
            _select_streamed(student_row, teacher_row, cols, num_classes, top_values, top_cols,
                             top_teacher, last_value, last_col, temperature, inv_temperature,
                             BLOCK, TOP_BLOCK, ACC))

    # 2. Pair and top-set terms on the d slots, in registers; the CE term.
    top_logits = tl.where(is_slot, top_values, NEG_FILL)  # empty slots would overflow exp()
    local, pair_grad, log_ps_top, pt_top = _local_term(
        top_logits, top_values, top_cols, top_teacher, slots, is_slot, inv_temperature,
        temperature, inv_num_groups, top_set_weight, irw_eps, erd_scale, erd_decay, ACC)
    ce = _cross_entropy(student_row, target, num_classes, ce_lse, ACC)
    # L = ce_weight CE + alpha L_local + beta L_rntk, and its parts (CE, L_local, L_rntk)
    store_three_part_loss(loss_ptr, parts_ptr, row, ce, local, rntk, ce_weight, alpha, beta)

    # 3. Gradient: remainder classes block by block (the row's second read when streamed), then
    #    the d top-set slots.
    if COMPUTE_GRAD:
        rntk_scale = beta * temperature
        if SINGLE_BLOCK:
            _store_remainder_grad(grad_row, student, teacher, in_row, cols, last_value, last_col,
                                  target, inv_temperature, s_lse, t_lse, rntk_scale, ce_lse,
                                  ce_weight)
        else:
            _stream_remainder_grad(grad_row, student_row, teacher_row, cols, num_classes,
                                   last_value, last_col, target, inv_temperature, s_lse, t_lse,
                                   rntk_scale, ce_lse, ce_weight, BLOCK, ACC)
        _store_top_set_grad(grad_row, top_logits, top_cols, is_slot, num_classes, pair_grad,
                            log_ps_top, pt_top, target, alpha, temperature, inv_num_groups,
                            top_set_weight, ce_lse, ce_weight)


@functools.cache
def ldrld_launch_config(num_classes, block_size=None, num_warps=None, *, fp64=False):
    """``launch_config``, with rows wider than one block streamed in ``STREAM_BLOCK`` columns
    (half that when the maths run in fp64: the per-lane statistics take two registers a value,
    and at 1024 columns the kernel spilled 104 bytes per thread, sm_90, triton 3.8)."""
    if block_size is None and num_classes > MAX_BLOCK:
        block_size = STREAM_BLOCK // 2 if fp64 else STREAM_BLOCK
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
    block, single_block, num_warps = ldrld_launch_config(num_classes, block_size, num_warps,
                                                         fp64=dtype == torch.float64)
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
