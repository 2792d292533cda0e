"""Pieces every fused row-loss kernel shares: streamed softmax statistics, block loads and launch
sizing."""

import functools

import torch
import triton
import triton.language as tl

# Fill for masked-out lanes. Finite on purpose: -inf fills make the interpreter emit numpy
# warnings, and any real logit (fp16 max 6.5e4) sits far above it.
NEG_FILL = tl.constexpr(-1e30)

# Rows up to this many classes stay in registers for the whole kernel (one read of the row);
# wider rows are streamed in blocks of this size, in several passes.
MAX_BLOCK = 4096


@functools.cache  # called on every launch: a dictionary lookup after the first
def launch_config(num_classes, block_size=None, num_warps=None):
    """Block width, whether the row fits one block, and warps for a row of ``num_classes``.

    ``block_size`` forces a width (tests use a small one to run the multi-block path);
    ``num_warps`` forces the warps (bench/tune_kernels.py compares settings).
    """
    block = block_size or min(triton.next_power_of_2(num_classes), MAX_BLOCK)
    num_warps = num_warps or (4 if block <= 1024 else 8 if block <= 2048 else 16)
    return block, num_classes <= block, num_warps


def compute_dtype(*tensors):
    """The dtype of the maths and of the per-row outputs: fp64 when any input is fp64 (used by
    exact tests), else fp32, for fp16, bf16 and fp32 inputs alike or mixed. (The rule of
    fastkd/precision.py, stated again: this package imports only torch and triton.)"""
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return torch.float64
    return torch.float32


def accumulator_dtype(dtype):
    """A ``compute_dtype`` as the kernels' ``ACC``. Each input is cast to it as it is loaded, so
    inputs of different dtypes need no copy."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_major(tensor):
    """The kernels index rows by stride and columns contiguously."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def row_outputs(student_logits, num_parts, needs_grad, dtype):
    """Per-row loss and parts buffers in ``dtype`` (the compute dtype) and, if ``needs_grad``, a
    gradient buffer in the student logits' dtype, for a launch."""
    batch = student_logits.shape[0]
    loss = torch.empty(batch, dtype=dtype, device=student_logits.device)
    parts = torch.empty(batch, num_parts, dtype=dtype, device=student_logits.device)
    grad = torch.empty_like(student_logits) if needs_grad else None
    return loss, parts, grad


def optional_output(tensor, placeholder):
    """``(pointer, row stride)`` kernel arguments for an output that may be skipped (None): the
    placeholder is passed instead and never written, the kernel's COMPUTE_GRAD being off."""
    return (placeholder, 0) if tensor is None else (tensor, tensor.stride(0))


@triton.jit
def row_prologue(student_ptr, teacher_ptr, grad_ptr, student_stride, teacher_stride, grad_stride,
                 temperature, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """What every row-loss program starts from: its row, the row's student, teacher and gradient
    pointers, a block's column offsets, and T (widened to ACC: float arguments arrive as fp32)
    with 1/T. The row index is int64 because row * stride passes 2^31 in large batches of wide
    rows."""
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.full([], temperature, ACC)
    return (row, student_ptr + row * student_stride, teacher_ptr + row * teacher_stride,
            grad_ptr + row * grad_stride, tl.arange(0, BLOCK), temperature, 1.0 / temperature)


@triton.jit
def load_block(row_ptr, cols, mask, ACC: tl.constexpr):
    """One block of a row in the accumulator dtype; masked lanes hold NEG_FILL (set after the
    cast, since -1e30 overflows fp16)."""
    return tl.where(mask, tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC), NEG_FILL)


@triton.jit
def load_blocks(student_row, teacher_row, block_cols, num_classes, ACC: tl.constexpr):
    """The lanes inside the row and one block's student and teacher logits (``load_block``)."""
    in_row = block_cols < num_classes
    return (in_row, load_block(student_row, block_cols, in_row, ACC),
            load_block(teacher_row, block_cols, in_row, ACC))


@triton.jit
def store_block(row_ptr, cols, values, mask):
    """Store one block, cast to the row's dtype."""
    tl.store(row_ptr + cols, values.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_three_part_loss(loss_ptr, parts_ptr, row, part_a, part_b, part_c, weight_a, weight_b,
                          weight_c):
    """A row's loss, ``weight_a part_a + weight_b part_b + weight_c part_c``, and its three parts
    (unweighted, in that order: the op's ``parts`` columns)."""
    tl.store(loss_ptr + row, weight_a * part_a + weight_b * part_b + weight_c * part_c)
    tl.store(parts_ptr + row * 3 + 0, part_a)
    tl.store(parts_ptr + row * 3 + 1, part_b)
    tl.store(parts_ptr + row * 3 + 2, part_c)


@triton.jit
def log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), finite for any finite x."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """exp(log_sigmoid(x)): no overflow for any finite x (the plain form overflows exp(-x))."""
    return tl.exp(log_sigmoid(x))


@triton.jit
def kl_term(log_p, log_q):
    """p (log p - log q), elementwise, and 0 where p = 0: a class at -inf in the target (a masked
    class) adds 0 log 0 = 0 (xlogy's convention), where exp(-inf) (-inf - log q) would be NaN.
    A NaN p stays NaN."""
    p = tl.exp(log_p)
    return tl.where(p == 0, 0.0, p * (log_p - log_q))


@triton.jit
def above_neg_fill(values):
    """``values`` with -inf (a masked class) raised to NEG_FILL, NaN kept (a comparison with NaN
    is false): the exp of the result is still exactly 0, and a difference of two is finite,
    where -inf - -inf or 0 * -inf would be NaN."""
    return tl.where(values < NEG_FILL, NEG_FILL, values)


@triton.jit
def binary_kl(teacher_gap, student_gap):
    """KL(Bernoulli(sigmoid(teacher_gap)) || Bernoulli(sigmoid(student_gap))), elementwise: the
    KL of a two-class softmax depends only on the logit gap. A finite teacher gap (callers raise
    a masked class's -inf with ``above_neg_fill``) makes an impossible outcome's term
    0 * finite = 0, where an infinite one would give 0 * -inf = NaN."""
    log_pt = log_sigmoid(teacher_gap)
    log_pt_other = log_sigmoid(-teacher_gap)
    log_ps = log_sigmoid(student_gap)
    log_ps_other = log_sigmoid(-student_gap)
    return tl.exp(log_pt) * (log_pt - log_ps) + tl.exp(log_pt_other) * (log_pt_other - log_ps_other)


@triton.jit
def masked_log_softmax(values, mask):
    """log softmax over the lanes where ``mask`` holds (a block held in registers)."""
    shifted = values - tl.max(tl.where(mask, values, NEG_FILL), axis=0)
    return shifted - tl.log(tl.sum(tl.where(mask, tl.exp(shifted), 0.0), axis=0))


@triton.jit
def online_logsumexp(running_max, running_sum, values, mask):
    """One block's update of a streamed log-sum-exp over the lanes where ``mask`` holds."""
    values = tl.where(mask, values, NEG_FILL)  # masked lanes may hold anything
    new_max = tl.maximum(running_max, tl.max(values, axis=0))
    exps = tl.where(mask, tl.exp(values - new_max), 0.0)
    return new_max, running_sum * tl.exp(running_max - new_max) + tl.sum(exps, axis=0)


@triton.jit
def empty_kl_stats(ACC: tl.constexpr):
    """Initial ``(t_max, t_sum, t_dot, s_max, s_sum)`` for ``online_kl_stats``: no lanes seen."""
    neg = tl.full([], NEG_FILL, ACC)
    zero = tl.zeros([], ACC)
    return neg, zero, zero, neg, zero


@triton.jit
def online_kl_stats(t_max, t_sum, t_dot, s_max, s_sum, teacher, student, mask):
    """One block's update of the statistics of KL(softmax(teacher) || softmax(student)) over the
    masked lanes: both log-sum-exps and ``t_dot = sum exp(teacher - t_max) * (teacher - student)``.
    ``kl_from_stats`` turns them into the divergence."""
    masked_teacher = tl.where(mask, teacher, NEG_FILL)  # masked lanes may hold anything
    new_max = tl.maximum(t_max, tl.max(masked_teacher, axis=0))
    rescale = tl.exp(t_max - new_max)
    exps = tl.where(mask, tl.exp(masked_teacher - new_max), 0.0)
    t_sum = t_sum * rescale + tl.sum(exps, axis=0)
    # exps is 0 outside the mask, and at a teacher logit of -inf (a masked class), where
    # teacher - student is -inf or NaN: such lanes add 0 (0 log 0 = 0).
    t_dot = t_dot * rescale + tl.sum(tl.where(exps == 0, 0.0, exps * (teacher - student)), axis=0)
    s_max, s_sum = online_logsumexp(s_max, s_sum, student, mask)
    return new_max, t_sum, t_dot, s_max, s_sum


@triton.jit
def kl_from_stats(t_max, t_sum, t_dot, s_max, s_sum):
    """KL(pt || ps) = E_pt[t - s] - lse(t) + lse(s); 0 for an empty class set. Returns the
    divergence and both log-sum-exps (for the gradient pass)."""
    nonempty = t_sum != 0  # not "> 0": a NaN sum (a NaN or +inf teacher logit) stays NaN
    t_lse = t_max + tl.log(tl.where(nonempty, t_sum, 1.0))
    s_lse = s_max + tl.log(tl.where(nonempty, s_sum, 1.0))
    kl = tl.where(nonempty, t_dot / tl.where(nonempty, t_sum, 1.0) - t_lse + s_lse, 0.0)
    return kl, t_lse, s_lse


# Per-lane ("lane") statistics. Lane i of a block folds in element i of every block it sees,
# elementwise, and the lanes are reduced to one value once, at the end of the row. A streamed
# row then costs no cross-lane reduction per block for its softmax statistics (the block-wise
# ``online_*`` helpers above cost one per statistic and block: on a GPU each is a warp-shuffle
# tree plus a shared-memory exchange between warps and its barriers). The price is registers:
# each statistic is a [BLOCK] vector instead of a scalar.


@triton.jit
def empty_lane_logsumexp(LANES: tl.constexpr, ACC: tl.constexpr):
    """Initial ``(lane_max, lane_sum)`` for ``lane_logsumexp``: no elements seen."""
    return tl.full([LANES], NEG_FILL, ACC), tl.zeros([LANES], ACC)


@triton.jit
def lane_logsumexp(lane_max, lane_sum, values, mask):
    """Fold ``values`` into each lane's streamed log-sum-exp where ``mask`` holds. One exp per
    element: exp(-|x - m|) rescales the lane's sum when x is its new max, and is x's own weight
    otherwise."""
    weight = tl.exp(-tl.abs(values - lane_max))  # finite: masked lanes hold finite fills
    grows = values > lane_max
    new_sum = tl.where(grows, lane_sum * weight + 1.0, lane_sum + weight)
    return (tl.where(mask, tl.maximum(lane_max, values), lane_max),
            tl.where(mask, new_sum, lane_sum))


@triton.jit
def reduce_lane_logsumexp(lane_max, lane_sum):
    """The ``(max, sum)`` of all lanes together (two reductions); empty lanes add 0."""
    row_max = tl.max(lane_max, axis=0)
    return row_max, tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)


@triton.jit
def empty_lane_kl_stats(LANES: tl.constexpr, ACC: tl.constexpr):
    """Initial per-lane ``(t_max, t_sum, t_dot, s_max, s_sum)`` for ``lane_kl_stats``."""
    t_max, t_sum = empty_lane_logsumexp(LANES, ACC)
    s_max, s_sum = empty_lane_logsumexp(LANES, ACC)
    return t_max, t_sum, tl.zeros([LANES], ACC), s_max, s_sum


@triton.jit
def lane_kl_stats(t_max, t_sum, t_dot, s_max, s_sum, teacher, student, mask):
    """``online_kl_stats`` per lane: fold ``teacher`` and ``student`` into each lane's
    statistics where ``mask`` holds, with ``t_dot = sum exp(teacher - t_max) (teacher -
    student)``; no cross-lane work."""
    weight = tl.exp(-tl.abs(teacher - t_max))
    grows = teacher > t_max
    gap = teacher - student
    new_sum = tl.where(grows, t_sum * weight + 1.0, t_sum + weight)
    # A teacher logit of -inf (a masked class) has weight 0 and adds 0, not 0 * -inf.
    new_dot = tl.where(grows, t_dot * weight + gap,
                       t_dot + tl.where(weight == 0, 0.0, weight * gap))
    s_max, s_sum = lane_logsumexp(s_max, s_sum, student, mask)
    return (tl.where(mask, tl.maximum(t_max, teacher), t_max), tl.where(mask, new_sum, t_sum),
            tl.where(mask, new_dot, t_dot), s_max, s_sum)


@triton.jit
def reduce_lane_kl_stats(t_max, t_sum, t_dot, s_max, s_sum):
    """The scalar ``(t_max, t_sum, t_dot, s_max, s_sum)`` of all lanes together, as
    ``online_kl_stats`` would have produced; ``kl_from_stats`` reads them."""
    row_t_max = tl.max(t_max, axis=0)
    rescale = tl.exp(t_max - row_t_max)
    row_s_max, row_s_sum = reduce_lane_logsumexp(s_max, s_sum)
    return (row_t_max, tl.sum(t_sum * rescale, axis=0), tl.sum(t_dot * rescale, axis=0),
            row_s_max, row_s_sum)


@triton.jit
def merge_kl_stats(t_max_a, t_sum_a, t_dot_a, s_max_a, s_sum_a,
                   t_max_b, t_sum_b, t_dot_b, s_max_b, s_sum_b):
    """The statistics of the union of two disjoint class sets, from each set's statistics."""
    t_max = tl.maximum(t_max_a, t_max_b)
    rescale_a = tl.exp(t_max_a - t_max)
    rescale_b = tl.exp(t_max_b - t_max)
    s_max = tl.maximum(s_max_a, s_max_b)
    return (t_max, t_sum_a * rescale_a + t_sum_b * rescale_b,
            t_dot_a * rescale_a + t_dot_b * rescale_b, s_max,
            s_sum_a * tl.exp(s_max_a - s_max) + s_sum_b * tl.exp(s_max_b - s_max))
