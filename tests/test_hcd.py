"""HCD's per-stage logit loss: the spec's worked example, every backend against the reference,
gradients, the orthogonality edge cases and bad input."""

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, FAST_BACKENDS, assert_close_scaled

from fastkd import HCDLogitLoss, hcd_logit_loss, kd_loss

# ---------------------------------------------------------------------------------------------
# The spec's worked example: B = 2, C = 6, n = 3, y = [1, 4].

SPEC_SHARED = [
    [0.15, 0.075, -1.05, -0.075, 0.55, 0.125, 0.225, 0.15, 0.075, -1.05, -0.075, 0.55, 0.125,
     0.225, 0.15, 0.075, -1.05, -0.075],
    [0.55, -0.55, -0.95, -0.65, -0.35, 0.65, 1.3, 0.55, -0.55, -0.95, -0.65, -0.35, 0.65, 1.3,
     0.55, -0.55, -0.95, -0.65],
]
SPEC_STUDENT = [[2.0, 1.0, 0.1, -1.0, 0.5, 0.0], [0.2, -0.3, 1.2, 0.4, 2.2, -1.0]]
SPEC_TEACHER = [[3.0, 2.5, -0.5, -2.0, 1.0, 0.0], [-1.0, 0.0, 2.0, 0.5, 3.5, -0.5]]


def spec_inputs():
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64, device=DEVICE)
    return (as_tensor(SPEC_SHARED), as_tensor(SPEC_TEACHER), as_tensor(SPEC_STUDENT),
            torch.tensor([1, 4], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_worked_example(backend):
    shared, teacher, student, target = spec_inputs()
    expected = {  # (label_smoothing, temperature): (L_sce, L_sdd)
        (0.0, 1.0): (0.803543, 0.142059), (0.1, 4.0): (1.014654, 0.379542)}
    for (smoothing, temperature), (sce, sdd) in expected.items():
        _, parts = hcd_logit_loss(shared, teacher, student, target, num_sub=3,
                                  label_smoothing=smoothing, temperature=temperature,
                                  backend=backend, return_parts=True)
        assert parts["sce"].item() == pytest.approx(sce, abs=1e-6)
        assert parts["sdd"].item() == pytest.approx(sdd, abs=1e-6)
        assert parts["ol"].item() == pytest.approx(0.119343, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_worked_example_total(backend):
    """CE(zs, y) + KD + one stage with the defaults (eps = 0, T = 1) = 3.010570."""
    shared, teacher, student, target = spec_inputs()
    ce = F.cross_entropy(student, target)
    assert ce.item() == pytest.approx(1.119133, abs=1e-6)
    assert F.cross_entropy(student, target, label_smoothing=0.1).item() == pytest.approx(
        1.234966, abs=1e-6)
    kd = kd_loss(student, teacher, temperature=1.0, backend=backend)
    assert kd.item() == pytest.approx(0.116200, abs=1e-6)
    assert kd_loss(student, teacher, temperature=4.0, backend=backend).item() == pytest.approx(
        0.308794, abs=1e-6)
    stage = hcd_logit_loss(shared, teacher, student, target, num_sub=3, backend=backend)
    assert (ce + kd + stage).item() == pytest.approx(3.010570, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Random inputs against the float64 reference.

def hcd_inputs(batch, num_sub, num_classes, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=2.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    shared, teacher = draw(batch, num_sub * num_classes), draw(batch, num_classes)
    student = draw(batch, num_classes)
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return (shared.to(DEVICE, dtype), teacher.to(DEVICE, dtype), student.to(DEVICE, dtype),
            target.to(DEVICE))


def run(shared, teacher, student, target, weights=None, **options):
    """Per-row loss, parts and the gradients w.r.t. shared and student of sum(weights * rows)."""
    shared = shared.detach().clone().requires_grad_()
    student = student.detach().clone().requires_grad_()
    rows, parts = hcd_logit_loss(shared, teacher, student, target, reduction="none",
                                 return_parts=True, **options)
    (rows if weights is None else rows * weights).sum().backward()
    return rows.detach(), parts, shared.grad, student.grad


def reference_run(shared, teacher, student, target, **options):
    return run(shared.double(), teacher.double(), student.double(), target,
               **{**options, "backend": "reference"})


# (batch, num_sub, classes, theta, label smoothing, detach_target, temperature); a kernel tile
# holds up to 1024 classes at n = 3 or 4 and 256 at n = 5 to 8 (hcd_launch_config), so the
# 1100-class row at n = 4 and the 300-class rows at n = 5 and 8 stream, each ending in a
# part-filled block, and n = 3's 300 classes are one part-filled tile.
RANDOM_CASES = [
    (1, 1, 2, 0.5, 0.0, False, 1.0), (4, 2, 5, 0.0, 0.1, True, 1.0),
    (3, 4, 100, 0.5, 0.1, False, 2.0), (8, 4, 100, 0.9, 0.0, False, 1.0),
    (2, 8, 37, 0.0, 0.0, True, 4.0), (5, 3, 300, 0.5, 0.1, True, 1.0),
    (2, 8, 300, 0.9, 0.1, False, 1.0), (2, 4, 1100, 0.5, 0.1, False, 4.0),
    (1, 5, 300, 0.0, 0.0, True, 1.0),
]


@pytest.mark.parametrize("batch,num_sub,num_classes,theta,smoothing,detach,temperature",
                         RANDOM_CASES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp32_matches_reference(backend, batch, num_sub, num_classes, theta, smoothing, detach,
                                temperature):
    inputs = hcd_inputs(batch, num_sub, num_classes, seed=batch * 1000 + num_classes + num_sub)
    options = dict(num_sub=num_sub, theta=theta, label_smoothing=smoothing, detach_target=detach,
                   temperature=temperature)
    rows, parts, grad_shared, grad_student = run(*inputs, backend=backend, **options)
    ref_rows, ref_parts, ref_grad_shared, ref_grad_student = reference_run(*inputs, **options)
    assert grad_shared.dtype == torch.float32 and grad_student.dtype == torch.float32
    assert_close_scaled(rows, ref_rows, 1e-5, "loss")
    for name in ("sce", "sdd", "ol"):
        assert_close_scaled(parts[name], ref_parts[name], 1e-5, name, temperature**2 * 1e-6)
    assert_close_scaled(grad_shared, ref_grad_shared, 1e-5, "shared gradient")
    assert_close_scaled(grad_student, ref_grad_student, 1e-5, "student gradient")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp64_matches_reference_exactly(backend):
    """Hyperparameters exact in fp32 (the kernels receive fp32 scalars), fusion weights != 1."""
    inputs = hcd_inputs(3, 4, 50, seed=41, dtype=torch.float64)
    weights = torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64, device=DEVICE)
    options = dict(num_sub=4, theta=0.25, label_smoothing=0.125, temperature=2.0, lam_s=0.75,
                   lam_t=1.25, w_gt=0.5, w_sdd=3.0, w_ol=2.0)
    actual = run(*inputs, weights=weights, backend=backend, **options)
    expected = reference_run(*inputs, weights=weights, **options)
    for name, got, want in zip(("loss", "parts", "shared grad", "student grad"), actual, expected):
        if name == "parts":
            for part in ("sce", "sdd", "ol"):
                assert_close_scaled(got[part], want[part], 1e-12, part)
        else:
            assert_close_scaled(got, want, 1e-12, name)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_inputs(backend, dtype, tolerance):
    """Same tolerances as LDRLD: fp32 loss, gradients rounded once to the input dtype."""
    inputs = hcd_inputs(4, 4, 60, seed=42, dtype=dtype)
    rows, _, grad_shared, grad_student = run(*inputs, backend=backend)
    ref_rows, _, ref_grad_shared, ref_grad_student = reference_run(*inputs)
    assert rows.dtype == torch.float32 and grad_shared.dtype == dtype
    assert_close_scaled(rows, ref_rows, 1e-5, "loss")
    assert_close_scaled(grad_shared, ref_grad_shared, tolerance, "shared gradient")
    assert_close_scaled(grad_student, ref_grad_student, tolerance, "student gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    """Finite differences check the full gradient (detach_target=True is a stop-gradient, not a
    derivative; the random cases compare it with the reference's autograd instead). Two rows of
    three sub-logits of three classes: each input costs two interpreted launches; a 1% error in
    any one gradient entry fails it."""
    shared, teacher, student, target = hcd_inputs(2, 3, 3, seed=43, dtype=torch.float64)
    shared.requires_grad_()
    student.requires_grad_()

    def loss(shared_logits, student_logits):
        return hcd_logit_loss(shared_logits, teacher, student_logits, target, num_sub=3,
                              theta=0.0, label_smoothing=0.1, temperature=2.0,
                              reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, (shared, student))


def test_triton_streams_rows_in_blocks():
    """Rows of 40 classes in 16-column tiles agree with the single-tile launch."""
    from fastkd.kernels.hcd import hcd_forward

    shared, teacher, student, target = hcd_inputs(3, 5, 40, seed=44, dtype=torch.float64)
    options = dict(num_sub=5, temperature=2.0, label_smoothing=0.0, theta=0.5, w_gt=1.0,
                   w_sdd=6.0, w_ol=1.0, lam_s=1.0, lam_t=1.0, detach_target=False)
    results = []
    for block_size in (16, None):
        rows, _, (grad_shared, _, grad_student) = hcd_forward(
            shared, teacher, student, target, block_size=block_size, **options)
        results.append((rows, grad_shared, grad_student))
    for streamed, single in zip(*results):
        torch.testing.assert_close(streamed, single, rtol=1e-12, atol=1e-12)


# Non-default weights, fusion and smoothing, so every term and scale reaches the kernel's output.
KERNEL_OPTIONS = dict(temperature=2.0, label_smoothing=0.125, theta=0.25, w_gt=0.5, w_sdd=3.0,
                      w_ol=2.0, lam_s=0.75, lam_t=1.25, detach_target=False)


def kernel_run(shared, teacher, student, target, block_size, **options):
    """The triton launcher itself: rows, parts {sce, sdd, ol} and the gradients of sum(rows)."""
    from fastkd.kernels.hcd import hcd_forward

    rows, parts, (grad_shared, _, grad_student) = hcd_forward(
        shared, teacher, student, target, block_size=block_size, **options)
    return rows, dict(zip(("sce", "sdd", "ol"), parts.unbind(1))), grad_shared, grad_student


def assert_matches_reference(actual, inputs, options, tolerance, grad_tolerance):
    expected = reference_run(*inputs, **options)
    rows, parts, grad_shared, grad_student = actual
    assert_close_scaled(rows, expected[0], tolerance, "loss")
    for name in ("sce", "sdd", "ol"):
        assert_close_scaled(parts[name], expected[1][name], tolerance, name)
    assert_close_scaled(grad_shared, expected[2], grad_tolerance, "shared gradient")
    assert_close_scaled(grad_student, expected[3], grad_tolerance, "student gradient")


@pytest.mark.parametrize("block_size", [16, None])  # 37 classes: 3 streamed blocks, or one tile
@pytest.mark.parametrize("num_sub", [1, 2, 3, 5, 16])  # tiles of 1, 2, 4, 8 and 16 rows
def test_triton_sub_logit_counts(num_sub, block_size):
    """Every tile height (padding rows included) in both branches, fp32 against the reference."""
    inputs = hcd_inputs(2, num_sub, 37, seed=60 + num_sub)
    options = dict(KERNEL_OPTIONS, num_sub=num_sub)
    actual = kernel_run(*inputs, block_size, **options)
    assert actual[2].dtype == torch.float32
    if num_sub > 1:
        assert (actual[1]["ol"] > 0).all()  # the orthogonality term and its gradient are live
    assert_matches_reference(actual, inputs, options, 1e-5, 1e-5)


@pytest.mark.parametrize("block_size", [16, None])
@pytest.mark.parametrize("num_sub", [3, 16])
@pytest.mark.parametrize("dtype,tolerance,grad_tolerance", [
    (torch.float64, 1e-12, 1e-12), (torch.float16, 1e-5, 1e-3), (torch.bfloat16, 1e-5, 1e-2)])
def test_triton_dtypes(dtype, tolerance, grad_tolerance, num_sub, block_size):
    """fp64 exactly, half precision with fp32 maths (losses to fp32 accuracy, gradients rounded
    once to the input dtype), against the reference on the same (rounded) inputs."""
    inputs = hcd_inputs(2, num_sub, 37, seed=70 + num_sub, dtype=dtype)
    options = dict(KERNEL_OPTIONS, num_sub=num_sub)
    actual = kernel_run(*inputs, block_size, **options)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert actual[0].dtype == expected_dtype and actual[2].dtype == dtype
    assert_matches_reference(actual, inputs, options, tolerance, grad_tolerance)


def test_launch_config_sizes():
    """Power-of-two blocks; one tile exactly when the row fits; no wider blocks for more
    sub-logits or for fp64."""
    from fastkd.kernels.hcd import MAX_NUM_SUB, MAX_TILE, hcd_launch_config, sub_rows

    for num_classes in (2, 100, 1000, 21843):
        for fp64 in (False, True):
            blocks = []
            for num_sub in range(1, MAX_NUM_SUB + 1):
                block, single, warps = hcd_launch_config(num_classes, num_sub=num_sub, fp64=fp64)
                assert block & (block - 1) == 0 and 1 <= warps <= 8
                assert single == (num_classes <= block)
                assert block * sub_rows(num_sub) <= MAX_TILE
                assert block <= hcd_launch_config(num_classes, num_sub=num_sub)[0]
                blocks.append(block)
            assert blocks == sorted(blocks, reverse=True)
    # n = 4 by default (bench/tune_kernels.py passes only the classes): 1000 classes fit one tile.
    assert hcd_launch_config(1000)[:2] == (1024, True)
    assert hcd_launch_config(21843)[:2] == (512, False)


# ---------------------------------------------------------------------------------------------
# Orthogonality edge cases.

@pytest.mark.parametrize("backend", BACKENDS)
def test_sub_logit_zero_outside_true_class_gives_no_nan(backend):
    """A fused sub-logit that is all zero once its true class is removed: no NaN anywhere."""
    shared, teacher, student, target = hcd_inputs(2, 3, 6, seed=45, dtype=torch.float64)
    teacher.zero_()
    shared[:, :6] = 0.0
    shared[0, target[0]] = 5.0  # only the true class is non-zero in sub-logit 0 of sample 0
    rows, parts, grad_shared, grad_student = run(shared, teacher, student, target, num_sub=3,
                                                 theta=0.0, backend=backend)
    for tensor in (rows, parts["ol"], grad_shared, grad_student):
        assert torch.isfinite(tensor).all()
    expected = reference_run(shared, teacher, student, target, num_sub=3, theta=0.0)
    assert_close_scaled(grad_shared, expected[2], 1e-12, "shared gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sub_logit_has_no_orthogonality_term(backend):
    rows, parts, _, _ = run(*hcd_inputs(3, 1, 10, seed=46), num_sub=1, backend=backend)
    assert torch.all(parts["ol"] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_sub_logits_are_penalised(backend):
    """n equal sub-logits: every cosine is 1, so L_ol = (1 - theta)^2."""
    _, teacher, student, target = hcd_inputs(2, 1, 8, seed=47, dtype=torch.float64)
    one = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    _, parts, _, _ = run(one.repeat(1, 4), teacher, student, target, num_sub=4, theta=0.5,
                         backend=backend)
    torch.testing.assert_close(parts["ol"], torch.full_like(parts["ol"], 0.25))


# ---------------------------------------------------------------------------------------------
# Reductions, teacher, layouts, module, bad input.

@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_parts_and_frozen_teacher(backend):
    shared, teacher, student, target = hcd_inputs(4, 2, 9, seed=48, dtype=torch.float64)
    teacher.requires_grad_()
    options = dict(num_sub=2, w_gt=2.0, w_sdd=3.0, w_ol=4.0, backend=backend, return_parts=True)
    rows, parts = hcd_logit_loss(shared, teacher, student, target, reduction="none", **options)
    torch.testing.assert_close(rows, 2.0 * parts["sce"] + 3.0 * parts["sdd"] + 4.0 * parts["ol"])
    mean, mean_parts = hcd_logit_loss(shared, teacher, student, target, **options)
    torch.testing.assert_close(mean, rows.mean())
    torch.testing.assert_close(mean_parts["ol"], parts["ol"].mean())
    total = hcd_logit_loss(shared, teacher, student.requires_grad_(), target, reduction="sum",
                           num_sub=2, backend=backend)
    total.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    shared, teacher, student, target = hcd_inputs(3, 3, 12, seed=49)
    strided_shared = torch.stack([shared, -shared], dim=2).flatten(1)[:, ::2]
    transposed_student = student.t().contiguous().t()
    actual = run(strided_shared, teacher, transposed_student, target, num_sub=3, backend=backend)
    expected = run(shared, teacher, student, target, num_sub=3, backend=backend)
    for got, want in zip(actual, expected):
        if isinstance(got, dict):
            continue
        torch.testing.assert_close(got, want)


def test_module_wrapper_matches_function():
    inputs = hcd_inputs(3, 4, 10, seed=50)
    module = HCDLogitLoss(num_sub=4, theta=0.3)
    assert "num_sub=4" in repr(module)
    torch.testing.assert_close(module(*inputs), hcd_logit_loss(*inputs, num_sub=4, theta=0.3))


@pytest.mark.parametrize(
    "shared_width,num_sub,message",
    [
        (18, 4, r"shared_logits must have num_sub \* classes = 4 \* 6 = 24 columns, got 18 = 3 sub-logits of 6 classes"),
        (20, 4, r"shared_logits must have num_sub \* classes = 4 \* 6 = 24 columns, got 20, not a multiple of 6 classes"),
        (24, 0, r"num_sub must be a positive integer, got 0"),
    ],
)
def test_bad_shared_logits(shared_width, num_sub, message):
    _, teacher, student, target = hcd_inputs(2, 1, 6, seed=51)
    with pytest.raises(ValueError, match=message):
        hcd_logit_loss(torch.zeros(2, shared_width, device=DEVICE), teacher, student, target,
                       num_sub=num_sub)


def test_bad_hcd_arguments():
    shared, teacher, student, target = hcd_inputs(2, 4, 6, seed=52)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape of student_logits \(2, 6\), got \(2, 5\)"):
        hcd_logit_loss(shared, teacher[:, :5], student, target)
    with pytest.raises(TypeError, match=r"shared_logits must be float16, bfloat16, float32 or float64, got torch.int64"):
        hcd_logit_loss(shared.long(), teacher, student, target)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got 1.0"):
        hcd_logit_loss(shared, teacher, student, target, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"shared_logits must be 2-D \[2, num_sub \* classes\], got shape \(3, 24\)"):
        hcd_logit_loss(torch.zeros(3, 24), teacher, student, target)
    many = hcd_inputs(2, 17, 6, seed=53)
    hcd_logit_loss(*many, num_sub=17, backend="torch")  # fine without the kernel
    with pytest.raises(ValueError, match="num_sub must be at most 16 for the triton backend, got 17"):
        hcd_logit_loss(*many, num_sub=17, backend="triton")

