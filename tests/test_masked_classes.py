"""-inf logits (a masked class, as when distilling on a subset of classes), issue 24 item 5.

A class at -inf has probability 0. The expectation is the plain torch formulation, written here
from ``log_softmax`` in float64 with autograd, under the convention of ``torch.xlogy`` (and of
``F.kl_div`` with a probability target): a class the teacher gives no probability adds
``0 log 0 = 0`` to a KL, whatever the student gives it. So:
- a class masked in both, or in the teacher only: a finite loss. The gradient at a class masked
  in both is 0; at a class masked in the teacher only it is T ps_c (the student is pushed off it).
- a class masked in the student only, where the teacher has mass: the KL is genuinely +inf (the
  student gives 0 to a class the teacher expects), and the loss is +inf, not NaN; its gradient,
  T (ps - pt), stays finite, as autograd of the plain formulation gives it.
Written out as ``F.kl_div(log_ps, log_pt, log_target=True)`` torch itself gives NaN at every
masked class (``exp(-inf) * (-inf - log_ps)``), so that form is not the expectation.

NaN and +inf logits are not masked classes: the row's loss is still no finite number.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close_scaled, distinct_logits

from fastkd import dkd_loss, kd_loss, ldrld_loss
from fastkd.ldrld_weights import ldrld_group_weights
from fastkd.methods.ldrld import LDRLD

# Every backend, plus the Triton kernels' streamed path (rows read in blocks of 4 columns).
RUNS = (*BACKENDS, "triton-streamed")
STREAM_BLOCK = 4
NUM_CLASSES = 10
TOP_D = 3
TEMPERATURES = (4.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The plain torch formulation (float64, autograd).


def plain_kl(student, teacher, temperature, group=None):
    """Per row T^2 KL(softmax(t / T) || softmax(s / T)) over the classes of ``group`` (all if
    None), with 0 log 0 = 0 where the teacher's probability is 0."""
    if group is not None:
        student = student.masked_fill(~group, -math.inf)
        teacher = teacher.masked_fill(~group, -math.inf)
    log_ps = F.log_softmax(student / temperature, dim=1)
    log_pt = F.log_softmax(teacher / temperature, dim=1)
    pt = log_pt.exp()
    return temperature**2 * torch.where(pt == 0, 0.0, pt * (log_pt - log_ps)).sum(1)


def plain_kd(student, teacher, target, temperature):
    return plain_kl(student, teacher, temperature), {}


def plain_dkd(student, teacher, target, temperature, alpha=1.0, beta=8.0):
    """TCKD: the binary (target, rest) split of the softmax, as two-class log-probabilities;
    NCKD: the softmax over the non-target classes."""
    is_target = F.one_hot(target, student.shape[1]).bool()

    def binary_logits(logits):
        """(z_y, T lse_{c != y}(z_c / T)): softmax(. / T) of these is (p_y, p_rest)."""
        rest = (logits / temperature).masked_fill(is_target, -math.inf).logsumexp(1)
        return torch.stack([logits[is_target], temperature * rest], dim=1)

    tckd = plain_kl(binary_logits(student), binary_logits(teacher), temperature)
    nckd = plain_kl(student, teacher, temperature, ~is_target)
    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}


def plain_ldrld(student, teacher, target, temperature):
    """The spec's LDRLD (shared/spec/ldrld.md) for top_d = TOP_D >= 3, default weights."""
    ranked = student.detach().topk(TOP_D, dim=1).indices

    def group(*ranks):
        return torch.zeros_like(student, dtype=torch.bool).scatter(1, ranked[:, list(ranks)], True)

    terms = []
    for i in range(TOP_D):
        for j in range(i + 1, TOP_D):
            r, q = i + 1, j + 1
            adw = 2.0 * math.exp(-0.05 * (r + q)) / (abs(r - q) + 1.5)
            terms.append(adw * plain_kl(student, teacher, temperature, group(i, j)))
    top_set = group(*range(TOP_D))
    terms.append(plain_kl(student, teacher, temperature, top_set))
    local = sum(terms) / len(terms)
    rntk = plain_kl(student, teacher, temperature, ~top_set)
    ce = F.cross_entropy(student, target, reduction="none")
    return ce + LDRLD.alpha * local + LDRLD.beta * rntk, {"ce": ce, "local": local, "rntk": rntk}


# ---------------------------------------------------------------------------------------------
# The backends.


def streamed_kernel(method, student, teacher, target, temperature):
    """The Triton kernel's per-row loss, parts by name and gradient, rows streamed."""
    from fastkd.kernels.kd import dkd_forward, kd_forward
    from fastkd.kernels.ldrld import ldrld_forward

    if method == "kd":
        rows, _, (grad,) = kd_forward(student, teacher, target, temperature=temperature,
                                      block_size=STREAM_BLOCK)
        return rows, {}, grad
    if method == "dkd":
        rows, parts, (grad,) = dkd_forward(student, teacher, target, alpha=1.0, beta=8.0,
                                           temperature=temperature, block_size=STREAM_BLOCK)
        return rows, {"tckd": parts[:, 0], "nckd": parts[:, 1]}, grad
    options = LDRLD.replace(top_d=TOP_D, temperature=temperature).loss_options()
    top_set_weight, num_groups = ldrld_group_weights(TOP_D, LDRLD.irw_eps, LDRLD.erd_scale,
                                                     LDRLD.erd_decay)
    rows, parts, (grad,) = ldrld_forward(student, teacher, target, block_size=STREAM_BLOCK,
                                         top_set_weight=top_set_weight, num_groups=num_groups,
                                         **options)
    return rows, {name: parts[:, k] for k, name in enumerate(("ce", "local", "rntk"))}, grad


def run(method, run_name, student, teacher, target, temperature):
    """Per-row loss, parts and d(sum of rows)/d student of one backend.

    The Triton interpreter computes every lane of a ``tl.where`` in numpy, and conftest.py makes
    an invalid operation there fail the test. With -inf logits the kernels form 0 * -inf or
    -inf - -inf in the branch they then discard (as torch.xlogy's convention does), so invalid
    operations are allowed here; overflows and divisions by zero still fail."""
    with np.errstate(invalid="ignore"):
        return _run(method, run_name, student, teacher, target, temperature)


def _run(method, run_name, student, teacher, target, temperature):
    if run_name == "triton-streamed":
        return streamed_kernel(method, student, teacher, target, temperature)
    student = student.detach().clone().requires_grad_()
    if method == "kd":
        rows = kd_loss(student, teacher, temperature=temperature, reduction="none",
                       backend=run_name)
        parts = {}
    elif method == "dkd":
        rows, parts = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0,
                               temperature=temperature, reduction="none", backend=run_name,
                               return_parts=True)
    else:
        rows, parts = ldrld_loss(student, teacher, target, top_d=TOP_D, temperature=temperature,
                                 reduction="none", backend=run_name, return_parts=True)
    rows.sum().backward()
    return rows.detach(), parts, student.grad


def expected(method, student, teacher, target, temperature):
    plain = {"kd": plain_kd, "dkd": plain_dkd, "ldrld": plain_ldrld}[method]
    student = student.detach().clone().requires_grad_()
    rows, parts = plain(student, teacher, target, temperature)
    rows.sum().backward()
    return rows.detach(), {name: part.detach() for name, part in parts.items()}, student.grad


# ---------------------------------------------------------------------------------------------
# Masks. Rows: distinct student logits (every backend ranks them alike), labels never masked.


def masked_inputs(case, seed=5):
    """Student and teacher logits (float64) with -inf at the case's classes, labels, and the
    classes masked in the student and in the teacher ([B, C] bool each)."""
    student, teacher, target = distinct_logits(3, NUM_CLASSES, seed, torch.float64)
    order = student.argsort(dim=1, descending=True)  # column r - 1: the class of rank r
    rank = {"top": 1, "second": 2, "next": TOP_D + 1, "middle": 6, "last": NUM_CLASSES}

    def classes(*names):
        mask = torch.zeros_like(student, dtype=torch.bool)
        for name in names:
            mask.scatter_(1, order[:, rank[name] - 1:rank[name]], True)
        return mask

    # (masked in the student, masked in the teacher)
    student_mask, teacher_mask = {
        # The same classes in both (the common case): they rank last, outside the top-d.
        "both": (classes("middle", "last"), classes("middle", "last")),
        # The teacher only, at a class the student ranks inside its top-d, or outside it.
        "teacher-inside": (classes(), classes("second")),
        "teacher-top": (classes(), classes("top")),
        "teacher-outside": (classes(), classes("next", "last")),
        "teacher-both-sides": (classes("last"), classes("second", "next", "last")),
        # The student only: a class the teacher gives mass to (a genuinely infinite KL).
        "student": (classes("last"), classes()),
    }[case]
    # Keep the labels off the masked classes: the CE of a masked label is +inf by itself.
    masked = student_mask | teacher_mask
    target = torch.stack([(~row).nonzero()[0, 0] for row in masked]).to(target.device)
    return (student.masked_fill(student_mask, -math.inf),
            teacher.masked_fill(teacher_mask, -math.inf), target, student_mask, teacher_mask)


FINITE_CASES = ("both", "teacher-inside", "teacher-top", "teacher-outside", "teacher-both-sides")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("case", FINITE_CASES)
@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("method", ["kd", "dkd", "ldrld"])
def test_masked_classes_give_the_plain_torch_result(method, run_name, case, temperature):
    """Loss, parts and gradient finite and equal to the plain torch formulation's; the gradient
    is 0 at a class masked in both."""
    student, teacher, target, student_mask, teacher_mask = masked_inputs(case)
    rows, parts, grad = run(method, run_name, student, teacher, target, temperature)
    ref_rows, ref_parts, ref_grad = expected(method, student, teacher, target, temperature)
    assert torch.isfinite(ref_rows).all() and torch.isfinite(ref_grad).all()  # the premise
    assert torch.isfinite(rows).all(), f"loss {rows}"
    assert torch.isfinite(grad).all(), f"gradient {grad}"
    assert_close_scaled(rows, ref_rows, 1e-10, "loss")
    for name, part in ref_parts.items():
        assert_close_scaled(parts[name], part, 1e-10, name)
    assert_close_scaled(grad, ref_grad, 1e-10, "gradient")
    assert (grad[student_mask & teacher_mask] == 0).all()


@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("method", ["kd", "dkd", "ldrld"])
def test_class_masked_in_the_student_only_gives_an_infinite_loss(method, run_name):
    """The teacher has mass where the student has none: the KL is +inf, shown as +inf (not NaN)
    in the loss, while the gradient T (ps - pt) is finite, as the plain formulation's."""
    student, teacher, target, _, _ = masked_inputs("student")
    rows, _, grad = run(method, run_name, student, teacher, target, 4.0)
    ref_rows, _, ref_grad = expected(method, student, teacher, target, 4.0)
    assert (ref_rows == math.inf).all()  # the premise
    assert (rows == math.inf).all(), f"loss {rows}"
    assert_close_scaled(grad, ref_grad, 1e-10, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("method", ["kd", "dkd", "ldrld"])
def test_masked_classes_in_low_precision(method, run_name, dtype):
    """-inf survives the cast to fp16 / fp32: the same finite result, at the dtype's tolerance."""
    student, teacher, target, student_mask, teacher_mask = masked_inputs("teacher-both-sides")
    student, teacher = student.to(dtype), teacher.to(dtype)
    rows, _, grad = run(method, run_name, student, teacher, target, 4.0)
    ref_rows, _, ref_grad = expected(method, student.double(), teacher.double(), target, 4.0)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close_scaled(rows, ref_rows, tolerance, "loss", atol_floor=16 * 1e-6)
    assert_close_scaled(grad, ref_grad, tolerance, "gradient")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaNs
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("method", ["kd", "dkd", "ldrld"])
def test_nan_and_positive_infinity_still_give_no_finite_loss(method, run_name, where, bad):
    """A NaN or +inf logit is not a masked class: its row's loss is not a number (NaN, or +inf
    where a +inf student logit makes the KL infinite), in every backend, the other rows are
    unharmed. (Before the -inf handling the Triton kernels gave a NaN or +inf teacher logit a
    finite KD and LDRLD loss: an empty-set test read a NaN sum as empty.)"""
    student, teacher, target, _, _ = masked_inputs("both")
    bad_student, bad_teacher = student.clone(), teacher.clone()
    (bad_student if where == "student" else bad_teacher)[0, 4] = bad
    rows, _, _ = run(method, run_name, bad_student, bad_teacher, target, 4.0)
    ref_rows, _, _ = expected(method, student, teacher, target, 4.0)
    assert not math.isfinite(rows[0].item()), f"loss {rows}"
    assert_close_scaled(rows[1:], ref_rows[1:], 1e-10, "other rows")


def test_plain_formulation_is_the_limit_of_finite_logits():
    """The expectation checked once more: a masked class is the limit of a very negative finite
    logit (at -1e4 its probability underflows to exactly 0 in float64), for which every backend
    was already tested against the authors' code."""
    student, teacher, target, student_mask, teacher_mask = masked_inputs("teacher-both-sides")
    finite_student = student.masked_fill(student_mask, -1e4)
    finite_teacher = teacher.masked_fill(teacher_mask, -1e4)
    for method in ("kd", "dkd", "ldrld"):
        rows, _, grad = expected(method, student, teacher, target, 4.0)
        limit_rows, _, limit_grad = run(method, "torch", finite_student, finite_teacher, target,
                                        4.0)
        assert_close_scaled(rows, limit_rows, 1e-12, f"{method} loss")
        assert_close_scaled(grad, limit_grad, 1e-12, f"{method} gradient")

