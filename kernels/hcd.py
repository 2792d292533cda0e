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
true-class entry 0 and u_j = v_j / |v_j|. Rows that fit one tile are read once; wider rows are
streamed twice (statistics, then gradients).

The tile has SUBS = next_power_of_2(n) rows, not tl.dot's 16: the n x n Gram matrix
G_jk = v_j . v_k and the orthogonality pull sum_k c_jk u_k are formed by a static loop over the
rows (one row times the tile, then a sum), so no padding rows are exponentiated, loaded or stored
and no operand is staged through shared memory. With n = 4 a dot would run on 16 x 16 tiles, 12 of
16 rows padding; at n = 16 it has no padding, but its M = N = 16 output gives at most 256 threads
work, each a serial sum over the whole block read from shared memory, so the loop is kept there too.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import (
    NEG_FILL,
    accumulator_dtype,
    compute_dtype,
    load_block,
    online_logsumexp,
    optional_output,
    row_major,
    row_outputs,
    row_prologue,
    store_three_part_loss,
)

MAX_NUM_SUB = 16
DEFAULT_NUM_SUB = 4  # the method's default n (shared/spec/hcd.md), for hcd_launch_config
# Launch sizes in tile elements (hcd_launch_config says what chose them).
MAX_TILE = 4096  # a [SUBS, BLOCK] tile kept in registers for the whole kernel
STREAM_TILE = 2048  # a tile of a streamed row
PULL_BUDGET = 16384  # SUBS^2 x BLOCK, the bound on the orthogonality pull's coefficients
MIN_BLOCK = 8  # the narrowest block (fp64 at n = 16)
TILE_PER_THREAD = 8  # what the warp count aims at
MAX_WARPS = 8  # 16 warps cap a thread at 128 registers


@triton.jit
def _load_tile(shared_row, teacher_row, student_row, subs, is_sub, block_cols, num_classes,
               lam_s, lam_t, ACC: tl.constexpr):
    """Fused sub-logits F [SUBS, BLOCK] (masked lanes 0) and student logits [BLOCK] (masked
    lanes NEG_FILL) of one block of classes."""
    in_row = block_cols < num_classes
    in_tile = is_sub[:, None] & in_row[None, :]
    shared = tl.load(shared_row + subs[:, None] * num_classes + block_cols[None, :],
                     mask=in_tile, other=0.0).to(ACC)
    teacher = tl.load(teacher_row + block_cols, mask=in_row, other=0.0).to(ACC)
    fused = tl.where(in_tile, lam_s * shared + lam_t * teacher[None, :], 0.0)
    return in_row, in_tile, fused, load_block(student_row, block_cols, in_row, ACC)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    """``tl.reduce``'s combine for four sums at once."""
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _row(tile, subs, j):
    """Row ``j`` of a [SUBS, BLOCK] tile as a [BLOCK] vector. The other rows become -0.0, the exact
    additive identity (x + -0.0 == x for every x, +0.0 included), so the sum is exact and, where a
    thread holds all the rows of its columns, the compiler can fold it to a plain register read."""
    return tl.sum(tl.where(subs[:, None] == j, tile, -0.0), axis=0)


@triton.jit
def _tile_stats(q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum, fused, student,
                in_row, in_tile, subs, block_cols, target, inv_temperature, SUBS: tl.constexpr):
    """Fold one tile into the per-sub-logit statistics: the running max m_j of F_j with
    sum exp(F_j - m_j) (q), sum exp(F_j/T - m_j/T) and sum exp(F_j/T - m_j/T) (F_j - zs)/T (pf,
    the KL dot product), the sum of F_j, the Gram matrix gram[k, j] = v_k . v_j, and the student's
    log-sum-exp at T (s).

    The running max of F_j / T is m_j / T: T > 0 and rounding is monotone, so
    max_c fl(F_jc / T) = fl(max_c F_jc / T) exactly, and one max serves both softmaxes."""
    # Masked lanes hold NEG_FILL: on a padding row (max NEG_FILL too) their exponents are 0.
    fused_or_fill = tl.where(in_tile, fused, NEG_FILL)
    new_max = tl.maximum(q_max, tl.max(fused_or_fill, axis=1))
    pf_max = new_max * inv_temperature
    q_exps = tl.where(in_tile, tl.exp(fused_or_fill - new_max[:, None]), 0.0)
    pf_exps = tl.where(in_tile, tl.exp(fused_or_fill * inv_temperature - pf_max[:, None]), 0.0)
    gaps = tl.where(in_tile, fused * inv_temperature - (student * inv_temperature)[None, :], 0.0)
    # The four row sums in one reduction: one exchange between warps instead of four.
    q_block, pf_block, dot_block, fused_block = tl.reduce(
        (q_exps, pf_exps, pf_exps * gaps, fused), 1, _add4)
    q_rescale = tl.exp(q_max - new_max)
    pf_rescale = tl.exp(q_max * inv_temperature - pf_max)
    # Gram column j: the tile times its row j, summed over the block's classes.
    without_target = tl.where((block_cols == target)[None, :], 0.0, fused)
    for j in tl.static_range(SUBS):
        column = tl.sum(without_target * _row(without_target, subs, j)[None, :], axis=1)
        gram += tl.where(subs[None, :] == j, column[:, None], 0.0)
    s_max, s_sum = online_logsumexp(s_max, s_sum, student * inv_temperature, in_row)
    return (new_max, q_sum * q_rescale + q_block, pf_sum * pf_rescale + pf_block,
            pf_dot * pf_rescale + dot_block, fused_sum + fused_block, gram, s_max, s_sum)


@triton.jit
def _tile_grads(fused, student, in_tile, subs, block_cols, target, q_lse, pf_lse, s_lse, kl,
                pull, inv_temperature, temperature, ce_scale, label_smoothing, num_classes,
                num_sub, w_sdd, lam_s, SUBS: tl.constexpr, DETACH_TARGET: tl.constexpr):
    """dL/dS [SUBS, BLOCK] and dL/dzs [BLOCK] for one tile of classes. The orthogonality term is
    dL/dv_j = sum_k pull_jk v_k (``pull`` from the kernel), summed row by row of the tile."""
    is_target = (block_cols == target)[None, :]
    q = tl.exp(fused - q_lse[:, None])
    smoothed = label_smoothing / num_classes + tl.where(is_target, 1.0 - label_smoothing, 0.0)
    grad = ce_scale * (q - smoothed)
    log_pf = fused * inv_temperature - pf_lse[:, None]
    pf = tl.where(in_tile, tl.exp(log_pf), 0.0)
    log_ps = student * inv_temperature - s_lse
    if not DETACH_TARGET:
        grad += (w_sdd * temperature / num_sub) * pf * (log_pf - log_ps[None, :] - kl[:, None])
    without_target = tl.where(in_tile & ~is_target, fused, 0.0)
    for k in tl.static_range(SUBS):
        pull_k = tl.sum(tl.where(subs[None, :] == k, pull, -0.0), axis=1)  # pull_jk for every j
        grad += pull_k[:, None] * _row(without_target, subs, k)[None, :]
    grad_student = w_sdd * temperature * (tl.exp(log_ps) - tl.sum(pf, axis=0) / num_sub)
    return lam_s * grad, grad_student


@triton.jit
def _empty_stats(SUBS: tl.constexpr, ACC: tl.constexpr):
    """``_tile_stats``'s running statistics before the first tile."""
    zeros = tl.zeros([SUBS], ACC)
    return (tl.full([SUBS], NEG_FILL, ACC), zeros, zeros, zeros, zeros,
            tl.zeros([SUBS, SUBS], ACC), tl.full([], NEG_FILL, ACC), tl.zeros([], ACC))


@triton.jit
def _softmax_terms(q_max, q_sum, pf_sum, pf_dot, fused_sum, s_max, s_sum, is_sub, fused_target,
                   valid_target, inv_temperature, temperature, label_smoothing, num_classes,
                   num_sub):
    """From the row's statistics: the log-sum-exps of F_j, F_j / T and zs / T, each sub-logit's
    KL, L_sce (NaN for an out-of-range label, instead of reading out of bounds) and L_sdd."""
    # Padding rows (j >= num_sub) get finite stand-ins so no exp() overflows on them.
    safe_pf_sum = tl.where(is_sub, pf_sum, 1.0)
    q_lse = tl.where(is_sub, q_max + tl.log(tl.where(is_sub, q_sum, 1.0)), 0.0)
    pf_lse = tl.where(is_sub, q_max * inv_temperature + tl.log(safe_pf_sum), 0.0)
    s_lse = s_max + tl.log(s_sum)
    ce = q_lse - (1.0 - label_smoothing) * fused_target - label_smoothing / num_classes * fused_sum
    sce = tl.sum(tl.where(is_sub, ce, 0.0), axis=0) / num_sub
    sce = tl.where(valid_target, sce, float("nan"))
    kl = tl.where(is_sub, pf_dot / safe_pf_sum - pf_lse + s_lse, 0.0)
    sdd = temperature * temperature * tl.sum(kl, axis=0) / num_sub
    return q_lse, pf_lse, s_lse, kl, sce, sdd


@triton.jit
def _orthogonality(gram, subs, is_sub, num_sub, theta):
    """L_ol from the Gram matrix of the v_j, with what its gradient reuses."""
    is_diagonal = subs[:, None] == subs[None, :]
    norm = tl.sqrt(tl.sum(tl.where(is_diagonal, gram, 0.0), axis=1))
    inv_norm = 1.0 / tl.maximum(norm, 1e-12)
    cosines = gram * inv_norm[:, None] * inv_norm[None, :]
    is_pair = is_sub[:, None] & is_sub[None, :] & ~is_diagonal
    excess = tl.where(is_pair, tl.maximum(cosines - theta, 0.0), 0.0)
    num_pairs = tl.maximum(num_sub * (num_sub - 1), 1)
    ol = tl.sum(tl.sum(excess * excess, axis=1), axis=0) / num_pairs
    return is_diagonal, inv_norm, cosines, excess, num_pairs, ol


@triton.jit
def _orthogonality_pull(excess, cosines, is_diagonal, inv_norm, w_ol, num_pairs):
    """w_ol dL_ol/dv_j = sum_k pull_jk v_k: with g_j = dL/du_j and u_k = v_k / |v_k|,
    dL/dv_j = (g_j - u_j (u_j . g_j)) / |v_j|."""
    coupling = (4.0 * w_ol / num_pairs) * excess
    along = tl.sum(coupling * cosines, axis=1)  # u_j . g_j
    return (tl.where(is_diagonal, -along[:, None], coupling)
            * inv_norm[:, None] * inv_norm[None, :])


@triton.jit
def _store_tile_grads(grad_shared_row, grad_student_row, fused, student, in_row, in_tile, subs,
                      block_cols, target, q_lse, pf_lse, s_lse, kl, pull, inv_temperature,
                      temperature, ce_scale, label_smoothing, num_classes, num_sub, w_sdd, lam_s,
                      SUBS: tl.constexpr, DETACH_TARGET: tl.constexpr):
    """One tile's gradients (``_tile_grads``), stored in the tile's dtype of each input."""
    grad, grad_student = _tile_grads(
        fused, student, in_tile, subs, block_cols, target, q_lse, pf_lse, s_lse, kl, pull,
        inv_temperature, temperature, ce_scale, label_smoothing, num_classes, num_sub, w_sdd,
        lam_s, SUBS, DETACH_TARGET)
    tl.store(grad_shared_row + subs[:, None] * num_classes + block_cols[None, :],
             grad.to(grad_shared_row.dtype.element_ty), mask=in_tile)
    tl.store(grad_student_row + block_cols, grad_student.to(grad_student_row.dtype.element_ty),
             mask=in_row)


@triton.jit
def _widened(label_smoothing, w_gt, w_sdd, w_ol, ACC: tl.constexpr):
    """The float arguments the kernel divides, in ACC: float arguments arrive as fp32."""
    return (tl.full([], label_smoothing, ACC), tl.full([], w_gt, ACC), tl.full([], w_sdd, ACC),
            tl.full([], w_ol, ACC))


@triton.jit
def _stats_in_one_tile(fused, student, in_row, in_tile, subs, cols, target, inv_temperature,
                       SUBS: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 on a row held in one tile: ``_tile_stats`` from ``_empty_stats`` (the maxima m_j
    of F_j with sum exp(F_j - m_j), sum exp((F_j - m_j) / T) and the KL dot product, sum_c F_jc,
    the Gram matrix v_k . v_j, and the student's log-sum-exp at T)."""
    q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _empty_stats(SUBS, ACC)
    return _tile_stats(q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum, fused,
                       student, in_row, in_tile, subs, cols, target, inv_temperature, SUBS)


@triton.jit
def _stats_streamed(shared_row, teacher_row, student_row, subs, is_sub, cols, num_classes,
                    target, inv_temperature, lam_s, lam_t, SUBS: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 over a row read in tiles of BLOCK columns: the statistics ``_stats_in_one_tile``
    returns, folded in tile by tile (``_tile_stats``)."""
    q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _empty_stats(SUBS, ACC)
    for start in range(0, num_classes, BLOCK):
        in_row, in_tile, fused, student = _load_tile(
            shared_row, teacher_row, student_row, subs, is_sub, start + cols, num_classes,
            lam_s, lam_t, ACC)
        q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _tile_stats(
            q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum,
            fused, student, in_row, in_tile, subs, start + cols, target, inv_temperature,
            SUBS)
    return q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum


@triton.jit
def _fused_target(shared_row, teacher_row, subs, is_sub, target, valid_target, num_classes,
                  lam_s, lam_t, ACC: tl.constexpr):
    """F_jy = lam_s S_jy + lam_t zt_y at the label y, for every sub-logit j; 0 where y is not a
    class (``valid_target`` false), instead of reading out of bounds."""
    target_shared = tl.load(shared_row + subs * num_classes + target,
                            mask=is_sub & valid_target, other=0.0).to(ACC)
    target_teacher = tl.load(teacher_row + target, mask=valid_target, other=0.0).to(ACC)
    return lam_s * target_shared + lam_t * target_teacher


@triton.jit
def _stream_tile_grads(grad_shared_row, grad_student_row, shared_row, teacher_row, student_row,
                       subs, is_sub, cols, target, q_lse, pf_lse, s_lse, kl, pull,
                       inv_temperature, temperature, ce_scale, label_smoothing, num_classes,
                       num_sub, w_sdd, lam_s, lam_t, SUBS: tl.constexpr, BLOCK: tl.constexpr,
                       DETACH_TARGET: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 over a streamed row: each tile read again and its dL/dS and dL/dzs stored
    (``_store_tile_grads``)."""
    for start in range(0, num_classes, BLOCK):
        in_row, in_tile, fused, student = _load_tile(
            shared_row, teacher_row, student_row, subs, is_sub, start + cols, num_classes,
            lam_s, lam_t, ACC)
        _store_tile_grads(
            grad_shared_row, grad_student_row, fused, student, in_row, in_tile, subs,
            start + cols, target, q_lse, pf_lse, s_lse, kl, pull, inv_temperature, temperature,
            ce_scale, label_smoothing, num_classes, num_sub, w_sdd, lam_s, SUBS, DETACH_TARGET)


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
    """One program per sample: its loss, parts and (COMPUTE_GRAD) gradients, in three phases."""
    row, student_row, teacher_row, grad_student_row, cols, temperature, inv_temperature = (
        row_prologue(student_ptr, teacher_ptr, grad_student_ptr, student_stride, teacher_stride,
                     grad_student_stride, temperature, BLOCK, ACC))
    shared_row = shared_ptr + row * shared_stride
    subs = tl.arange(0, SUBS)
    is_sub = subs < num_sub
    label_smoothing, w_gt, w_sdd, w_ol = _widened(label_smoothing, w_gt, w_sdd, w_ol, ACC)
    target = tl.load(target_ptr + row).to(tl.int32)
    valid_target = (target >= 0) & (target < num_classes)

    # 1. Per-sub-logit statistics: log-sum-exp of F_j and of F_j / T, the KL dot product, the sum
    #    of F_j (label smoothing), and the Gram matrix of the v_j.
    if SINGLE_BLOCK:
        in_row, in_tile, fused, student = _load_tile(
            shared_row, teacher_row, student_row, subs, is_sub, cols, num_classes, lam_s, lam_t,
            ACC)
        q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _stats_in_one_tile(
            fused, student, in_row, in_tile, subs, cols, target, inv_temperature, SUBS, ACC)
    else:
        q_max, q_sum, pf_sum, pf_dot, fused_sum, gram, s_max, s_sum = _stats_streamed(
            shared_row, teacher_row, student_row, subs, is_sub, cols, num_classes, target,
            inv_temperature, lam_s, lam_t, SUBS, BLOCK, ACC)

    # 2. The three terms.
    fused_target = _fused_target(shared_row, teacher_row, subs, is_sub, target, valid_target,
                                 num_classes, lam_s, lam_t, ACC)
    q_lse, pf_lse, s_lse, kl, sce, sdd = _softmax_terms(
        q_max, q_sum, pf_sum, pf_dot, fused_sum, s_max, s_sum, is_sub, fused_target,
        valid_target, inv_temperature, temperature, label_smoothing, num_classes, num_sub)
    is_diagonal, inv_norm, cosines, excess, num_pairs, ol = _orthogonality(
        gram, subs, is_sub, num_sub, theta)
    # L = w_gt L_sce + w_sdd L_sdd + w_ol L_ol, and its parts (L_sce, L_sdd, L_ol)
    store_three_part_loss(loss_ptr, parts_ptr, row, sce, sdd, ol, w_gt, w_sdd, w_ol)

    # 3. Gradients, tile by tile.
    if COMPUTE_GRAD:
        grad_shared_row = grad_shared_ptr + row * grad_shared_stride
        pull = _orthogonality_pull(excess, cosines, is_diagonal, inv_norm, w_ol, num_pairs)
        ce_scale = w_gt / num_sub
        if SINGLE_BLOCK:  # the tile is still in registers
            _store_tile_grads(
                grad_shared_row, grad_student_row, fused, student, in_row, in_tile, subs, cols,
                target, q_lse, pf_lse, s_lse, kl, pull, inv_temperature, temperature, ce_scale,
                label_smoothing, num_classes, num_sub, w_sdd, lam_s, SUBS, DETACH_TARGET)
        else:
            _stream_tile_grads(
                grad_shared_row, grad_student_row, shared_row, teacher_row, student_row, subs,
                is_sub, cols, target, q_lse, pf_lse, s_lse, kl, pull, inv_temperature,
                temperature, ce_scale, label_smoothing, num_classes, num_sub, w_sdd, lam_s,
                lam_t, SUBS, BLOCK, DETACH_TARGET, ACC)


def sub_rows(num_sub):
    """The rows of the kernel's sub-logit tile (its SUBS): the next power of two >= num_sub."""
    return triton.next_power_of_2(num_sub)


@functools.cache  # called on every launch: a dictionary lookup after the first
def hcd_launch_config(num_classes, block_size=None, num_warps=None, *, num_sub=DEFAULT_NUM_SUB,
                      fp64=False):
    """Block width, whether the row fits one tile, and warps, for rows of ``num_classes`` classes
    and ``num_sub`` sub-logits (``fp64``: the maths run in fp64).

    Unmeasured: with no GPU at hand these settings were chosen by compiling for sm_90 and reading
    registers, stack (spill) bytes and barriers from ptxas/cuobjdump, not by timing.
    - A row of up to MAX_TILE / SUBS classes (1024 at n = 4) is one tile, read once; wider rows
      stream in STREAM_TILE / SUBS columns (512 at n = 4), twice.
    - Warps: about TILE_PER_THREAD tile elements per thread, at most MAX_WARPS.
    - The orthogonality pull needs SUBS coefficients for each tile row a thread holds, all live at
      once (they are loop-invariant, so they are hoisted out of the stream loop). At n = 16 a
      thread holding all 16 rows of a column needs 256 and spills; SUBS^2 x BLOCK <= PULL_BUDGET
      keeps blocks at 64 columns there, with at least SUBS / 2 warps to spread each column's
      rows. (At 128 columns, triton 3.6, the GPU machines' compiler, spilled 32-232 bytes at
      n = 16 and 16 bytes for fp64 at n = 4; triton 3.8 none.)
    - fp64 (the exact-test path) is sized as 4x the rows with at most 4 warps: its values take two
      registers and its exp is a long software routine.

    Before (every row padded to a [16, BLOCK] tile for tl.dot; bench/tune_kernels.py on an H200):
    at B = 1024, C = 21843, 256-wide blocks with 4 warps took 9.0 ms in fp32 and 7.5 ms in bf16,
    against 25.6 / 21.1 ms for 1024-wide blocks with 16 warps, and 5.2 ms for the torch backend;
    at B = 256, C = 1000 fp32, 313 us against the torch backend's 138 us (issue 14; forward and
    backward). Compiled for sm_90, that kernel also spilled: a 4664-byte stack frame per thread at
    C = 1000 in fp32, 5024 bytes streamed (cuobjdump's STACK; its LOCAL stayed 0).
    """
    # fp64 values take two registers and fp64 exp is a long software routine: size as 4x the rows.
    rows = sub_rows(num_sub) * (4 if fp64 else 1)
    widest = max(min(MAX_TILE // rows, PULL_BUDGET // rows**2), MIN_BLOCK)
    block = block_size or (triton.next_power_of_2(num_classes) if num_classes <= widest
                           else max(min(STREAM_TILE // rows, PULL_BUDGET // rows**2), MIN_BLOCK))
    # At least a warp per two sub-logit rows: fewer spilled the pull at n = 16 (triton 3.6).
    num_warps = num_warps or min(max(rows * block // (32 * TILE_PER_THREAD),
                                     sub_rows(num_sub) // 2, 1),
                                 MAX_WARPS // (2 if fp64 else 1))
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
    block, single_block, num_warps = hcd_launch_config(
        num_classes, block_size, num_warps, num_sub=num_sub, fp64=dtype == torch.float64)
    _hcd_kernel[(batch,)](
        shared_logits, teacher_logits, student_logits, target, loss, parts,
        grad_shared_ptr, grad_student_ptr,
        shared_logits.stride(0), teacher_logits.stride(0), student_logits.stride(0),
        grad_shared_stride, grad_student_stride,
        num_classes, num_sub,
        float(temperature), float(label_smoothing), float(theta), float(w_gt), float(w_sdd),
        float(w_ol), float(lam_s), float(lam_t),
        ACC=accumulator_dtype(dtype), SUBS=sub_rows(num_sub), BLOCK=block,
        SINGLE_BLOCK=single_block, DETACH_TARGET=bool(detach_target), COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )
    return loss, parts, (grad_shared if needs_grad[0] else None, None,
                         grad_student if needs_grad[2] else None)
