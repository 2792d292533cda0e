"""LDRLD: the spec's worked example, every backend against the reference, gradients, edge cases."""

import functools
import math

import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICE,
    FAST_BACKENDS,
    assert_close_scaled,
    distinct_logits,
    loss_and_grad,
    random_logits,
)

from fastkd import LDRLDLoss, ldrld_loss
from fastkd.ldrld_weights import ldrld_group_weights
from fastkd.methods.ldrld import LDRLD
from fastkd.reference import adaptive_decay_weight, ldrld_loss_reference
from fastkd.reference.ldrld import masked_kl

ldrld_parts = functools.partial(ldrld_loss, return_parts=True)


def reference_rows(student, teacher, target, **options):
    """Float64 reference per-row loss, parts and gradient of the sum of rows."""
    options.setdefault("backend", "reference")
    return loss_and_grad(ldrld_parts, student.double(), teacher.double(), target, **options)


# ---------------------------------------------------------------------------------------------
# The spec's worked example: C = 5, d = 3, y = 0.

SPEC_STUDENT = [[2.0, 1.0, 0.5, -1.0, 3.0]]
SPEC_TEACHER = [[4.0, 1.0, 2.5, -2.0, 3.5]]
SPEC = {  # temperature: (L_local, L_rntk, total)
    4.0: (0.211206, 0.930550, 10.203770),
    1.0: (0.148008, 0.157405, 4.128174),
}
SPEC_CE = 1.472261
SPEC_ADW = dict(irw_eps=1.5, erd_scale=2.0, erd_decay=0.05)  # the spec's (and the authors') ADW
SPEC_GRAD_T4 = [-2.471246, 1.471040, -4.542955, 4.542955, 1.000205]


def spec_inputs():
    student = torch.tensor(SPEC_STUDENT, dtype=torch.float64, device=DEVICE)
    teacher = torch.tensor(SPEC_TEACHER, dtype=torch.float64, device=DEVICE)
    return student, teacher, torch.tensor([0], device=DEVICE)


def test_adaptive_decay_weights_match_spec():
    expected = {(1, 2): 0.688566, (1, 3): 0.467846, (2, 3): 0.623041, (6, 7): 0.417637,
                (1, 7): 0.178752}
    for ranks, weight in expected.items():
        assert adaptive_decay_weight(*ranks, **SPEC_ADW) == pytest.approx(weight, abs=1e-6)


def test_spec_group_table():
    """Each group's T^2*KL from the spec's table, through the reference's masked softmax."""
    student, teacher, _ = spec_inputs()
    groups = {(4, 0): 0.280702, (4, 1): 0.028731, (0, 1): 0.458524, (4, 0, 1): 0.352420,
              (2, 3): 0.930550}
    for classes, expected in groups.items():
        mask = torch.zeros_like(student, dtype=torch.bool)
        mask[0, list(classes)] = True
        assert masked_kl(student, teacher, mask, 4.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature", sorted(SPEC))
@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_worked_example(backend, temperature):
    student, teacher, target = spec_inputs()
    local, rntk, total = SPEC[temperature]
    loss, parts = ldrld_loss(student, teacher, target, temperature=temperature, top_d=3,
                             backend=backend, return_parts=True)
    assert loss.item() == pytest.approx(total, abs=1e-6)
    assert parts["local"].item() == pytest.approx(local, abs=1e-6)
    assert parts["rntk"].item() == pytest.approx(rntk, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(SPEC_CE, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_worked_example_gradient(backend):
    student, teacher, target = spec_inputs()
    student.requires_grad_()
    # The spec's gradient is of alpha*L_local + beta*L_rntk: switch the CE term off.
    ldrld_loss(student, teacher, target, top_d=3, ce_weight=0.0, backend=backend).backward()
    expected = torch.tensor([SPEC_GRAD_T4], dtype=torch.float64)
    torch.testing.assert_close(student.grad.cpu(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Random inputs against the float64 reference.

# (batch, classes, top_d, temperature): every listed B, C, top_d and T appears; 5000 classes
# exceed one kernel block (4096), so that row is streamed in blocks. The interpreter runs a
# program per row: batches stay small, but the larger ones hold rows whose target is among the
# student's top_d and rows whose target is not (test_random_rows_put_the_target_on_both_sides).
RANDOM_CASES = [
    (1, 2, 1, 4.0), (3, 2, 2, 1.0), (3, 5, 1, 1.0), (1, 5, 2, 4.0), (16, 5, 2, 4.0),
    (3, 100, 7, 4.0), (1, 100, 10, 1.0), (20, 100, 7, 1.0), (3, 1000, 7, 4.0),
    (1, 1000, 10, 1.0), (3, 1003, 2, 4.0), (3, 1003, 10, 4.0), (1, 1003, 7, 1.0),
    (3, 5000, 7, 4.0), (1, 5000, 10, 1.0),
]


def random_case(batch, num_classes, top_d):
    return random_logits(batch, num_classes, seed=batch * 100003 + num_classes * 31 + top_d)


def test_random_rows_put_the_target_on_both_sides():
    """In the cases of 5 and of 100 classes, some rows have the target among the student's top_d
    classes and some do not."""
    for batch, num_classes, top_d, _ in RANDOM_CASES:
        if batch > 10:
            student, _, target = random_case(batch, num_classes, top_d)
            inside = (student.topk(top_d, dim=1).indices == target[:, None]).any(dim=1)
            assert 0 < int(inside.sum()) < batch, (batch, num_classes, top_d)


@pytest.mark.parametrize("batch,num_classes,top_d,temperature", RANDOM_CASES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp32_matches_reference(backend, batch, num_classes, top_d, temperature):
    student, teacher, target = random_case(batch, num_classes, top_d)
    options = dict(top_d=top_d, temperature=temperature)
    rows, parts, grad = loss_and_grad(ldrld_parts, student, teacher, target, backend=backend,
                                      **options)
    ref_rows, ref_parts, ref_grad = reference_rows(student, teacher, target, **options)
    assert grad.dtype == torch.float32
    assert_close_scaled(rows, ref_rows, 1e-5, "loss")
    for name in ("ce", "local", "rntk"):
        assert_close_scaled(parts[name], ref_parts[name], 1e-5, name)
    assert_close_scaled(grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("batch,num_classes,top_d", [(3, 100, 7), (2, 1003, 10), (2, 5000, 2)])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp64_matches_reference_exactly(backend, batch, num_classes, top_d):
    student, teacher, target = random_logits(batch, num_classes, seed=7, dtype=torch.float64)
    rows, parts, grad = loss_and_grad(ldrld_parts, student, teacher, target, backend=backend,
                                      top_d=top_d)
    ref_rows, ref_parts, ref_grad = reference_rows(student, teacher, target, top_d=top_d)
    assert_close_scaled(rows, ref_rows, 1e-12, "loss")
    for name in ("ce", "local", "rntk"):
        assert_close_scaled(parts[name], ref_parts[name], 1e-12, name)
    assert_close_scaled(grad, ref_grad, 1e-12, "gradient")


# Half-precision inputs are exact in the float64 reference; the loss is computed in fp32, so it
# keeps the fp32 tolerance. The gradient is rounded to the input dtype: one rounding for fp16
# (2^-11 relative), and for bf16 up to 1 ulp (2^-7) because the interpreter truncates fp32->bf16.
HALF_TOLERANCES = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", sorted(HALF_TOLERANCES, key=str))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_inputs(backend, dtype):
    student, teacher, target = distinct_logits(4, 200, seed=3, dtype=dtype)
    rows, parts, grad = loss_and_grad(ldrld_parts, student, teacher, target, backend=backend)
    ref_rows, ref_parts, ref_grad = reference_rows(student, teacher, target)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    assert_close_scaled(rows, ref_rows, 1e-5, "loss")
    for name in ("ce", "local", "rntk"):
        assert_close_scaled(parts[name], ref_parts[name], 1e-5, name)
    assert_close_scaled(grad, ref_grad, HALF_TOLERANCES[dtype], "gradient")


# ---------------------------------------------------------------------------------------------
# Gradients.

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    student, teacher, target = random_logits(2, 6, seed=11, dtype=torch.float64)
    student.requires_grad_()

    def loss(zs):
        return ldrld_loss(zs, teacher, target, top_d=3, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-8)


def test_triton_gradient_equals_autograd_of_reference():
    student, teacher, target = random_logits(4, 37, seed=5, dtype=torch.float64)
    fused = student.clone().requires_grad_()
    ldrld_loss(fused, teacher, target, backend="triton").backward()
    plain = student.clone().requires_grad_()
    loss, _ = ldrld_loss_reference(plain, teacher, target, **LDRLD.loss_options())
    loss.mean().backward()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradients_scale_rows(backend):
    """Non-unit and per-sample upstream gradients reach the student rows they belong to."""
    student, teacher, target = random_logits(5, 40, seed=9, dtype=torch.float64)
    weights = torch.tensor([0.0, 1.0, -2.0, 3.5, 0.25], dtype=torch.float64, device=DEVICE)
    weighted = student.clone().requires_grad_()
    (ldrld_loss(weighted, teacher, target, reduction="none", backend=backend) * weights).sum().backward()
    scaled = student.clone().requires_grad_()
    (2.5 * ldrld_loss(scaled, teacher, target, backend=backend)).backward()
    _, _, per_row_grad = reference_rows(student, teacher, target)
    torch.testing.assert_close(weighted.grad, per_row_grad * weights[:, None], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled.grad, per_row_grad * 2.5 / 5, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    student, teacher, target = random_logits(3, 20, seed=4)
    student.requires_grad_()
    teacher.requires_grad_()
    ldrld_loss(student, teacher, target, backend=backend).backward()
    assert teacher.grad is None
    assert student.grad is not None


# ---------------------------------------------------------------------------------------------
# Reductions, layouts, edge cases.

@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_parts(backend):
    student, teacher, target = random_logits(6, 30, seed=8, dtype=torch.float64)
    options = dict(top_d=5, alpha=2.0, beta=3.0, ce_weight=0.5, backend=backend, return_parts=True)
    rows, row_parts = ldrld_loss(student, teacher, target, reduction="none", **options)
    mean, mean_parts = ldrld_loss(student, teacher, target, reduction="mean", **options)
    total, sum_parts = ldrld_loss(student, teacher, target, reduction="sum", **options)
    assert rows.shape == (6,) and mean.shape == () and total.shape == ()
    torch.testing.assert_close(mean, rows.mean())
    torch.testing.assert_close(total, rows.sum())
    for name in ("ce", "local", "rntk"):
        torch.testing.assert_close(mean_parts[name], row_parts[name].mean())
        torch.testing.assert_close(sum_parts[name], row_parts[name].sum())
    recombined = 0.5 * row_parts["ce"] + 2.0 * row_parts["local"] + 3.0 * row_parts["rntk"]
    torch.testing.assert_close(rows, recombined)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    student, teacher, target = random_logits(4, 60, seed=12)
    strided_student = torch.stack([student, -student], dim=2).flatten(1)[:, ::2]  # stride 2
    transposed_teacher = teacher.t().contiguous().t()  # column-major
    assert not strided_student.is_contiguous() and not transposed_teacher.is_contiguous()
    rows, _, grad = loss_and_grad(ldrld_parts, strided_student, transposed_teacher, target,
                                  backend=backend)
    expected_rows, _, expected_grad = loss_and_grad(ldrld_parts, student, teacher, target,
                                                    backend=backend)
    torch.testing.assert_close(rows, expected_rows)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_d_one_and_all_classes(backend):
    student, teacher, target = random_logits(3, 6, seed=13, dtype=torch.float64)
    _, parts = ldrld_loss(student, teacher, target, top_d=1, backend=backend, reduction="none",
                          return_parts=True)
    assert torch.all(parts["local"] == 0)
    _, parts = ldrld_loss(student, teacher, target, top_d=6, backend=backend, reduction="none",
                          return_parts=True)
    assert torch.all(parts["rntk"] == 0)
    assert torch.all(parts["local"] > 0)


def test_top_d_two_counts_the_pair_twice():
    """d = 2: (ADW(1,2) KL_pair + ADW(1,2) KL_G) / 2 = ADW(1,2) KL_pair, as the authors' code."""
    adw = adaptive_decay_weight(1, 2, LDRLD.irw_eps, LDRLD.erd_scale, LDRLD.erd_decay)
    assert ldrld_group_weights(2, LDRLD.irw_eps, LDRLD.erd_scale, LDRLD.erd_decay) == (
        pytest.approx(adw), 2)
    student, teacher, target = random_logits(2, 9, seed=14, dtype=torch.float64)
    _, parts = ldrld_loss(student, teacher, target, top_d=2, temperature=2.0, backend="triton",
                          reduction="none", return_parts=True)
    top2 = student.topk(2, dim=1).indices
    mask = torch.zeros_like(student, dtype=torch.bool).scatter(1, top2, True)
    expected = adw * masked_kl(student, teacher, mask, 2.0)
    torch.testing.assert_close(parts["local"], expected)


def test_triton_breaks_ties_by_lower_class_index():
    """Equal student logits rank by class index: the same loss as logits nudged down by index."""
    student = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]], dtype=torch.float64, device=DEVICE)
    teacher = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0, 4.0]], dtype=torch.float64, device=DEVICE)
    target = torch.tensor([2], device=DEVICE)
    nudged = student - 1e-9 * torch.arange(6, dtype=torch.float64, device=DEVICE)
    for top_d in (2, 3):
        fused = ldrld_loss(student, teacher, target, top_d=top_d, backend="triton")
        expected = ldrld_loss(nudged, teacher, target, top_d=top_d, backend="reference")
        assert fused.item() == pytest.approx(expected.item(), abs=1e-7)


def streamed_triton_rows(student, teacher, target, top_d, block_size=16):
    """The Triton kernel's per-row loss, parts [B, 3] (ce, local, rntk) and gradient, with rows
    streamed in ``block_size`` columns: the path of rows wider than one kernel block (4096),
    forced on small rows (None: the launcher's choice). Also returns the loss options, for the
    reference."""
    from fastkd.kernels.ldrld import ldrld_forward

    options = LDRLD.replace(top_d=top_d).loss_options()
    top_set_weight, num_groups = ldrld_group_weights(top_d, LDRLD.irw_eps, LDRLD.erd_scale,
                                                     LDRLD.erd_decay)
    rows, parts, (grad,) = ldrld_forward(student, teacher, target, block_size=block_size,
                                         top_set_weight=top_set_weight, num_groups=num_groups,
                                         **options)
    return rows, parts, grad, options


def assert_matches_reference(rows, parts, grad, reference, rtol, grad_rtol=None):
    """Loss, each part and the gradient against ``reference_rows``' output."""
    ref_rows, ref_parts, ref_grad = reference
    assert_close_scaled(rows, ref_rows, rtol, "loss")
    for column, name in enumerate(("ce", "local", "rntk")):
        assert_close_scaled(parts[:, column], ref_parts[name], rtol, name)
    assert_close_scaled(grad, ref_grad, grad_rtol or rtol, "gradient")


@pytest.mark.parametrize("where", ["spread", "last_block", "first_block"])
def test_triton_multi_block_selection(where):
    """Rows of 110 classes streamed in 16-column blocks: the top-d classes spread over blocks, all
    in the last (partial) block, or all in the first."""
    student, teacher, target = random_logits(3, 110, seed=15, dtype=torch.float64)
    top_columns = {"spread": [3, 20, 47, 63, 80, 95, 109],
                   "last_block": [97, 99, 101, 103, 105, 107, 109],
                   "first_block": [0, 2, 5, 9, 11, 13, 15]}[where]
    for rank, column in enumerate(top_columns):
        student[:, column] = 20.0 - rank
    rows, parts, grad, options = streamed_triton_rows(student, teacher, target, top_d=7)
    assert_matches_reference(rows, parts, grad, reference_rows(student, teacher, target, **options),
                             1e-12)


# Streamed selection (16-column blocks) against the float64 reference. Student rows are k/8 for
# distinct integers k (exact and tie-free down to bf16), the top set placed as each case says:
#   one_block: all in one middle block; spread: one per block; last_block: all in the last,
#   partial block; ascending: the row ascends, so every block evicts the whole set (d <= 16) or
#   16 of its members (d = 32); descending: the first block holds the set and the prefilter skips
#   every later block; random: no placement.
STREAMED_CASES = [  # (where, classes, top_d)
    ("one_block", 110, 7), ("one_block", 37, 1), ("spread", 110, 7), ("spread", 110, 1),
    ("last_block", 110, 7), ("last_block", 98, 2), ("ascending", 110, 7),
    ("ascending", 101, 32), ("ascending", 37, 1), ("descending", 110, 7), ("random", 37, 32),
    ("random", 32, 32), ("random", 100, 10),
]
STREAMED_DTYPES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
                   torch.float16: (1e-5, HALF_TOLERANCES[torch.float16]),
                   torch.bfloat16: (1e-5, HALF_TOLERANCES[torch.bfloat16])}


def placed_top_logits(where, num_classes, top_d, seed):
    """Student (float64, values k/8 with distinct |k| <= 256), teacher and labels for one row
    pair, the student's top-d classes placed as ``where`` says."""
    generator = torch.Generator().manual_seed(seed)
    batch = 2
    if where == "ascending":
        base = torch.arange(num_classes, dtype=torch.float64).repeat(batch, 1)
    elif where == "descending":
        base = torch.arange(num_classes, 0, -1, dtype=torch.float64).repeat(batch, 1)
    else:
        base = torch.stack([torch.randperm(num_classes, generator=generator)
                            for _ in range(batch)]).to(torch.float64)
    student = (base - num_classes) / 8  # in [-num_classes / 8, 0]
    last = (num_classes - 1) // 16 * 16
    columns = {"one_block": range(16, 16 + top_d), "spread": range(5, num_classes, 16),
               "last_block": range(num_classes - 1, last - 1, -1)}.get(where, [])
    columns = list(columns)[:top_d]
    if columns:
        assert len(columns) == top_d and len(set(columns)) == top_d
        ranks = torch.randperm(top_d, generator=generator).to(torch.float64)
        student[:, columns] = 20.0 - ranks / 2  # above every other class, in shuffled order
    teacher = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return student.to(DEVICE), teacher.to(DEVICE), target.to(DEVICE)


@pytest.mark.parametrize("where,num_classes,top_d", STREAMED_CASES)
def test_triton_streamed_selection(where, num_classes, top_d):
    student, teacher, target = placed_top_logits(where, num_classes, top_d, seed=num_classes)
    rows, parts, grad, options = streamed_triton_rows(student, teacher, target, top_d)
    assert_matches_reference(rows, parts, grad, reference_rows(student, teacher, target, **options),
                             1e-12)
    if num_classes == top_d:
        assert torch.all(parts[:, 2] == 0)  # empty remainder


@pytest.mark.parametrize("dtype", sorted(STREAMED_DTYPES, key=str))
@pytest.mark.parametrize("where", ["spread", "ascending"])
def test_triton_streamed_selection_dtypes(where, dtype):
    """fp16 / bf16 / fp32 / fp64 inputs of the streamed path (the logits are exact in each)."""
    student, teacher, target = placed_top_logits(where, 110, 7, seed=23)
    student, teacher = student.to(dtype), teacher.to(dtype)
    rows, parts, grad, options = streamed_triton_rows(student, teacher, target, 7)
    assert grad.dtype == dtype
    loss_rtol, grad_rtol = STREAMED_DTYPES[dtype]
    assert_matches_reference(rows, parts, grad.double(),
                             reference_rows(student, teacher, target, **options), loss_rtol,
                             grad_rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("top_d", [3, 5, 32])
def test_triton_streamed_ties_straddle_blocks(top_d, dtype):
    """Equal student logits across block borders (columns 13..18 and 94..97, blocks of 16, a
    partial last block) rank by class index: the same loss and gradient as the reference on
    logits nudged down by index. The cut of the top set falls inside a tie for top_d = 3 and 5."""
    student, teacher, target = placed_top_logits("random", 98, top_d, seed=29)
    student[:, [40, 70]] = torch.tensor([11.0, 10.0], dtype=torch.float64, device=DEVICE)
    student[:, 13:19] = 9.0
    student[:, 94:98] = 9.0
    student, teacher = student.to(dtype), teacher.to(dtype)
    rows, parts, grad, options = streamed_triton_rows(student, teacher, target, top_d)
    nudged = student.double() - 1e-12 * torch.arange(98, dtype=torch.float64, device=DEVICE)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    assert_matches_reference(rows, parts, grad.double(),
                             reference_rows(nudged, teacher, target, **options), tolerance,
                             HALF_TOLERANCES.get(dtype, tolerance))


@pytest.mark.parametrize("where", ["spread", "ascending"])
def test_triton_streamed_top_set_far_above_the_rest(where):
    """Top-set logits 1e4 above the remainder (fp32): the remainder's softmax must keep its own
    running max per lane, not borrow one a top-set member set, or its sum underflows to 0."""
    student, teacher, target = placed_top_logits(where, 110, 7, seed=31)
    is_top = student >= 10.0 if where == "spread" else student >= student[:, -7:-6]
    student, teacher = torch.where(is_top, student + 1e4, student).float(), teacher.float()
    rows, parts, grad, options = streamed_triton_rows(student, teacher, target, 7)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    # The gradient's CE part at the top set, exp(z - lse), inherits the rounding of lse ~ 1e4 to
    # fp32 (spacing 1e-3): about 5e-4 relative, as in any fp32 kernel.
    assert_matches_reference(rows, parts, grad, reference_rows(student, teacher, target, **options),
                             1e-5, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,magnitude", [(torch.float16, 6e4), (torch.float32, 1e4)])
def test_large_logits_stay_finite(backend, dtype, magnitude):
    generator = torch.Generator().manual_seed(16)
    student = (torch.rand(3, 50, generator=generator) * 2 - 1) * magnitude
    teacher = (torch.rand(3, 50, generator=generator) * 2 - 1) * magnitude
    target = torch.randint(0, 50, (3,), generator=generator)
    student, teacher, target = student.to(DEVICE, dtype), teacher.to(DEVICE, dtype), target.to(DEVICE)
    rows, parts, grad = loss_and_grad(ldrld_parts, student, teacher, target, backend=backend)
    assert torch.isfinite(rows).all() and torch.isfinite(grad.float()).all()
    ref_rows, _, _ = reference_rows(student, teacher, target)
    assert_close_scaled(rows, ref_rows, 1e-4, "loss")


def test_triton_out_of_range_label_gives_nan_not_a_crash():
    """On CUDA the label range is not checked by default (it would sync); the kernel must not
    read out of bounds, and the loss says something is wrong."""
    from fastkd.kernels.ldrld import ldrld_forward

    student, teacher, _ = random_logits(2, 10, seed=17)
    target = torch.tensor([3, 10], device=DEVICE)
    options = LDRLD.replace(top_d=3).loss_options()
    top_set_weight, num_groups = ldrld_group_weights(3, LDRLD.irw_eps, LDRLD.erd_scale,
                                                     LDRLD.erd_decay)
    loss, _, _ = ldrld_forward(student, teacher, target, top_set_weight=top_set_weight,
                               num_groups=num_groups, **options)
    assert torch.isfinite(loss[0]) and math.isnan(loss[1].item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaNs
@pytest.mark.parametrize("block_size", [16, None])
def test_triton_nan_row_stays_in_bounds(block_size):
    """A student row of NaNs (a diverged step) selects no class: its loss is NaN, and its empty
    top-set slots write nothing (their columns lie 2^30 past the row). Other rows are unharmed."""
    student, teacher, target = random_logits(2, 40, seed=3, dtype=torch.float64)
    student[0] = float("nan")
    rows, _, grad, options = streamed_triton_rows(student, teacher, target, 7, block_size)
    ref_rows, _, ref_grad = reference_rows(student[1:], teacher[1:], target[1:], **options)
    assert math.isnan(rows[0].item())
    assert_close_scaled(rows[1:], ref_rows, 1e-12, "loss")
    assert_close_scaled(grad[1:], ref_grad, 1e-12, "gradient")


def test_module_wrapper_matches_function():
    student, teacher, target = random_logits(4, 25, seed=18)
    module = LDRLDLoss(top_d=5, temperature=2.0, backend="torch")
    assert "top_d=5" in repr(module)
    expected = ldrld_loss(student, teacher, target, top_d=5, temperature=2.0, backend="torch")
    torch.testing.assert_close(module(student, teacher, target), expected)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_widest_rows_and_largest_top_d(backend):
    """C = 32768 (eight 4096-column blocks in the kernel) and top_d = 32, the kernel's limit."""
    student, teacher, target = random_logits(1, 32768, seed=19)
    rows, parts, grad = loss_and_grad(ldrld_parts, student, teacher, target, backend=backend,
                                      top_d=32)
    ref_rows, ref_parts, ref_grad = reference_rows(student, teacher, target, top_d=32)
    assert_close_scaled(rows, ref_rows, 1e-5, "loss")
    assert_close_scaled(parts["local"], ref_parts["local"], 1e-5, "local")
    assert_close_scaled(grad, ref_grad, 1e-5, "gradient")
