"""Hinton KD and Decoupled KD: hand-worked examples, every backend against the reference."""

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

from fastkd import DKDLoss, KDLoss, dkd_loss, kd_loss

dkd_parts = functools.partial(dkd_loss, return_parts=True)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_hand_worked_example(backend):
    """zs = [a, 0], zt = [0, a]: the softmaxes are mirrored, so with x = a/T
    KL = x * (pt_1 - pt_0) = x tanh(x/2), L = T^2 KL = T a tanh(a / 2T), dL/dzs_0 = T (ps_0 - pt_0)."""
    a, temperature = 1.0, 2.0
    student = torch.tensor([[a, 0.0]], dtype=torch.float64, device=DEVICE, requires_grad=True)
    teacher = torch.tensor([[0.0, a]], dtype=torch.float64, device=DEVICE)
    loss = kd_loss(student, teacher, temperature=temperature, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(temperature * a * math.tanh(a / (2 * temperature)), abs=1e-12)
    grad0 = temperature * (sigmoid(a / temperature) - sigmoid(-a / temperature))
    torch.testing.assert_close(student.grad.cpu(), torch.tensor([[grad0, -grad0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dkd_hand_worked_example(backend):
    """C = 3, y = 0, T = 1, zs = [2, 1, 0], zt = [0, 0, 0] (uniform teacher):
    TCKD = 1/3 ln((1/3) / ps_y) + 2/3 ln((2/3) / ps_rest) with ps_y = e^2 / (e^2 + e + 1);
    NCKD = KL((1/2, 1/2) || (sigmoid(1), sigmoid(-1))) = -ln 2 - ln(sigmoid(1) sigmoid(-1)) / 2."""
    student = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    teacher = torch.zeros(1, 3, dtype=torch.float64, device=DEVICE)
    target = torch.tensor([0], device=DEVICE)
    e = math.e
    ps_target = e**2 / (e**2 + e + 1)
    tckd = math.log((1 / 3) / ps_target) / 3 + 2 * math.log((2 / 3) / (1 - ps_target)) / 3
    nckd = -math.log(2) - math.log(sigmoid(1) * sigmoid(-1)) / 2
    loss, parts = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=1.0,
                           backend=backend, return_parts=True)
    assert parts["tckd"].item() == pytest.approx(tckd, abs=1e-12)
    assert parts["nckd"].item() == pytest.approx(nckd, abs=1e-12)
    assert loss.item() == pytest.approx(tckd + 8.0 * nckd, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dkd_gradient_formula(backend):
    """dTCKD/dzs_y = T(ps_y - pt_y); dTCKD/dzs_c = T qs_c (ps_rest - pt_rest) and
    dNCKD/dzs_c = T (qs_c - qt_c) for c != y, with q the non-target softmax."""
    student, teacher, target = random_logits(3, 7, seed=21, dtype=torch.float64)
    alpha, beta, temperature = 1.5, 8.0, 2.0
    grad = loss_and_grad(dkd_parts, student, teacher, target, alpha=alpha, beta=beta,
                         temperature=temperature, backend=backend)[2]
    is_target = torch.nn.functional.one_hot(target, 7).bool()
    ps = torch.softmax(student / temperature, dim=1)
    pt = torch.softmax(teacher / temperature, dim=1)
    qs = torch.softmax((student / temperature).masked_fill(is_target, -math.inf), dim=1)
    qt = torch.softmax((teacher / temperature).masked_fill(is_target, -math.inf), dim=1)
    rest_gap = (ps.masked_fill(is_target, 0).sum(1) - pt.masked_fill(is_target, 0).sum(1))[:, None]
    expected = temperature * torch.where(
        is_target, alpha * (ps - pt), alpha * qs * rest_gap + beta * (qs - qt))
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# (batch, classes, temperature); 5000 classes exceed one kernel block.
RANDOM_CASES = [(1, 2, 4.0), (3, 5, 1.0), (16, 100, 4.0), (3, 1000, 1.0), (3, 1003, 4.0),
                (2, 5000, 4.0)]


@pytest.mark.parametrize("batch,num_classes,temperature", RANDOM_CASES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp32_matches_reference(backend, batch, num_classes, temperature):
    student, teacher, target = random_logits(batch, num_classes, seed=batch + num_classes)
    kd_rows, _, kd_grad = loss_and_grad(kd_loss, student, teacher, temperature=temperature,
                                        backend=backend)
    ref_kd_rows, _, ref_kd_grad = loss_and_grad(kd_loss, student.double(), teacher.double(),
                                                temperature=temperature, backend="reference")
    kl_floor = temperature**2 * 1e-6  # see assert_close_scaled
    assert_close_scaled(kd_rows, ref_kd_rows, 1e-5, "kd loss", kl_floor)
    assert_close_scaled(kd_grad, ref_kd_grad, 1e-5, "kd gradient")

    rows, parts, grad = loss_and_grad(dkd_parts, student, teacher, target,
                                      temperature=temperature, backend=backend)
    ref_rows, ref_parts, ref_grad = loss_and_grad(dkd_parts, student.double(), teacher.double(),
                                                  target, temperature=temperature,
                                                  backend="reference")
    assert_close_scaled(rows, ref_rows, 1e-5, "dkd loss", 9 * kl_floor)  # alpha + beta = 9
    for name in ("tckd", "nckd"):
        assert_close_scaled(parts[name], ref_parts[name], 1e-5, name, kl_floor)
    assert_close_scaled(grad, ref_grad, 1e-5, "dkd gradient")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_inputs(backend, dtype, tolerance):
    """Same tolerances as LDRLD: fp32 loss, gradient rounded once to the input dtype."""
    student, teacher, target = distinct_logits(4, 200, seed=22, dtype=dtype)
    rows, _, grad = loss_and_grad(dkd_parts, student, teacher, target, backend=backend)
    ref_rows, _, ref_grad = loss_and_grad(dkd_parts, student.double(), teacher.double(), target,
                                          backend="reference")
    assert grad.dtype == dtype
    assert_close_scaled(rows, ref_rows, 1e-5, "dkd loss")
    assert_close_scaled(grad, ref_grad, tolerance, "dkd gradient")
    kd_rows, _, kd_grad = loss_and_grad(kd_loss, student, teacher, backend=backend)
    ref_kd_rows, _, ref_kd_grad = loss_and_grad(kd_loss, student.double(), teacher.double(),
                                                backend="reference")
    assert_close_scaled(kd_rows, ref_kd_rows, 1e-5, "kd loss")
    assert_close_scaled(kd_grad, ref_kd_grad, tolerance, "kd gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    student, teacher, target = random_logits(2, 6, seed=23, dtype=torch.float64)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda zs: kd_loss(zs, teacher, reduction="none", backend=backend), (student,))
    assert torch.autograd.gradcheck(
        lambda zs: dkd_loss(zs, teacher, target, reduction="none", backend=backend), (student,))


def test_triton_multi_block_rows():
    """Rows of 100 classes streamed in 16-column blocks, target in a middle block: the launchers'
    loss and gradient against the reference's autograd."""
    from fastkd.kernels.kd import dkd_forward, kd_forward

    student, teacher, _ = random_logits(3, 100, seed=24, dtype=torch.float64)
    target = torch.tensor([40, 0, 99], device=DEVICE)
    kd_rows, _, (kd_grad,) = kd_forward(student, teacher, None, block_size=16, temperature=3.0)
    dkd_rows, _, (dkd_grad,) = dkd_forward(student, teacher, target, block_size=16, alpha=1.0,
                                           beta=8.0, temperature=3.0)
    plain = student.clone().requires_grad_()
    expected = (kd_loss(plain, teacher, temperature=3.0, reduction="none", backend="reference")
                + dkd_loss(plain, teacher, target, alpha=1.0, beta=8.0, temperature=3.0,
                           reduction="none", backend="reference"))
    expected.sum().backward()
    torch.testing.assert_close(kd_rows + dkd_rows, expected.detach())
    torch.testing.assert_close(kd_grad + dkd_grad, plain.grad)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_dkd_confident_teacher_keeps_rest_mass(backend):
    """A teacher with nearly all mass on the target: p_rest ~ 1e-17 must not cancel to 0 or a
    negative number (log p_rest comes from log-sum-exps, not 1 - p_target)."""
    student = torch.tensor([[0.0, 1.0, -1.0, 0.5]], dtype=torch.float32, device=DEVICE)
    teacher = torch.tensor([[40.0, 0.0, 1.0, -2.0]], dtype=torch.float32, device=DEVICE)
    target = torch.tensor([0], device=DEVICE)
    _, parts = dkd_loss(student, teacher, target, temperature=1.0, backend=backend,
                        return_parts=True)
    _, exact = dkd_loss(student.double(), teacher.double(), target, temperature=1.0,
                        backend="reference", return_parts=True)
    assert parts["tckd"].item() == pytest.approx(exact["tckd"].item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    student, teacher, target = random_logits(3, 20, seed=25)
    student.requires_grad_()
    teacher.requires_grad_()
    (kd_loss(student, teacher, backend=backend)
     + dkd_loss(student, teacher, target, backend=backend)).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    student, teacher, target = random_logits(5, 12, seed=26, dtype=torch.float64)
    rows = kd_loss(student, teacher, reduction="none", backend=backend)
    torch.testing.assert_close(kd_loss(student, teacher, backend=backend), rows.mean())
    torch.testing.assert_close(kd_loss(student, teacher, reduction="sum", backend=backend), rows.sum())
    rows, parts = dkd_loss(student, teacher, target, reduction="none", backend=backend,
                           alpha=2.0, beta=3.0, return_parts=True)
    torch.testing.assert_close(rows, 2.0 * parts["tckd"] + 3.0 * parts["nckd"])
    total, total_parts = dkd_loss(student, teacher, target, reduction="sum", backend=backend,
                                  alpha=2.0, beta=3.0, return_parts=True)
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(total_parts["nckd"], parts["nckd"].sum())


def test_module_wrappers_match_functions():
    student, teacher, target = random_logits(4, 25, seed=27)
    torch.testing.assert_close(KDLoss(temperature=2.0)(student, teacher),
                               kd_loss(student, teacher, temperature=2.0))
    torch.testing.assert_close(DKDLoss(beta=4.0)(student, teacher, target),
                               dkd_loss(student, teacher, target, beta=4.0))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_widest_rows(backend):
    """C = 32768: eight 4096-column blocks in the kernels."""
    student, teacher, target = random_logits(1, 32768, seed=28)
    rows, _, grad = loss_and_grad(dkd_parts, student, teacher, target, backend=backend)
    ref_rows, _, ref_grad = loss_and_grad(dkd_parts, student.double(), teacher.double(), target,
                                          backend="reference")
    assert_close_scaled(rows, ref_rows, 1e-5, "dkd loss")
    assert_close_scaled(grad, ref_grad, 1e-5, "dkd gradient")
    kd_rows, _, kd_grad = loss_and_grad(kd_loss, student, teacher, backend=backend)
    ref_kd_rows, _, ref_kd_grad = loss_and_grad(kd_loss, student.double(), teacher.double(),
                                                backend="reference")
    assert_close_scaled(kd_rows, ref_kd_rows, 1e-5, "kd loss")
    assert_close_scaled(kd_grad, ref_kd_grad, 1e-5, "kd gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    student, teacher, target = random_logits(4, 60, seed=29)
    strided_student = torch.stack([student, -student], dim=2).flatten(1)[:, ::2]  # stride 2
    transposed_teacher = teacher.t().contiguous().t()  # column-major
    for loss_fn, labels in ((kd_loss, None), (dkd_parts, target)):
        rows, _, grad = loss_and_grad(loss_fn, strided_student, transposed_teacher, labels,
                                      backend=backend)
        expected_rows, _, expected_grad = loss_and_grad(loss_fn, student, teacher, labels,
                                                        backend=backend)
        torch.testing.assert_close(rows, expected_rows)
        torch.testing.assert_close(grad, expected_grad)
