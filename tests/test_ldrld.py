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
from fastkd.functional import ldrld_group_weights
from fastkd.options import LDRLD
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
# exceed one kernel block (4096), so that row is streamed in blocks.
RANDOM_CASES = [
    (1, 2, 1, 4.0), (3, 2, 2, 1.0), (3, 5, 1, 1.0), (1, 5, 2, 4.0), (64, 5, 2, 4.0),
    (3, 100, 7, 4.0), (1, 100, 10, 1.0), (64, 100, 7, 1.0), (3, 1000, 7, 4.0),
    (1, 1000, 10, 1.0), (3, 1003, 2, 4.0), (3, 1003, 10, 4.0), (1, 1003, 7, 1.0),
    (3, 5000, 7, 4.0), (1, 5000, 10, 1.0),
]


@pytest.mark.parametrize("batch,num_classes,top_d,temperature", RANDOM_CASES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp32_matches_reference(backend, batch, num_classes, top_d, temperature):
    seed = batch * 100003 + num_classes * 31 + top_d
    student, teacher, target = random_logits(batch, num_classes, seed)
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


@pytest.mark.parametrize("where", ["spread", "last_block", "first_block"])
def test_triton_multi_block_selection(where):
    """Rows of 110 classes streamed in 16-column blocks: the top-d classes spread over blocks, all
    in the last (partial) block, or all in the first."""
    from fastkd.kernels.autograd import RowLossFunction
    from fastkd.kernels.ldrld import ldrld_forward

    student, teacher, target = random_logits(3, 110, seed=15, dtype=torch.float64)
    top_columns = {"spread": [3, 20, 47, 63, 80, 95, 109],
                   "last_block": [97, 99, 101, 103, 105, 107, 109],
                   "first_block": [0, 2, 5, 9, 11, 13, 15]}[where]
    for rank, column in enumerate(top_columns):
        student[:, column] = 20.0 - rank
    options = LDRLD.replace(top_d=7).loss_options()
    top_set_weight, num_groups = ldrld_group_weights(7, LDRLD.irw_eps, LDRLD.erd_scale,
                                                     LDRLD.erd_decay)
    launcher = functools.partial(ldrld_forward, block_size=16, top_set_weight=top_set_weight,
                                 num_groups=num_groups, **options)
    fused = student.clone().requires_grad_()
    rows, parts = RowLossFunction.apply(launcher, fused, teacher, target)
    rows.sum().backward()
    ref_rows, ref_parts, ref_grad = reference_rows(student, teacher, target, **options)
    assert_close_scaled(rows, ref_rows, 1e-12, "loss")
    assert_close_scaled(parts[:, 1], ref_parts["local"], 1e-12, "local")
    assert_close_scaled(fused.grad, ref_grad, 1e-12, "gradient")


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
