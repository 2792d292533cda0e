"""Bad input gets a clear error naming the argument and what was expected; backend dispatch."""

import numpy as np
import pytest
import torch
from helpers import random_logits

from fastkd import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss
from fastkd.functional import requested_backend
from fastkd.ops import runs_triton


@pytest.fixture
def inputs():
    return random_logits(4, 10, seed=31)


# Each loss with its label argument filled in where it takes one, so a case runs against all three.
LOSSES = {
    "ldrld": lambda zs, zt, y, **kw: ldrld_loss(zs, zt, y, **kw),
    "dkd": lambda zs, zt, y, **kw: dkd_loss(zs, zt, y, **kw),
    "kd": lambda zs, zt, y, **kw: kd_loss(zs, zt, **kw),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda zs, zt, y: (zs[0], zt[0], y), ValueError, r"student_logits must be 2-D \[batch, classes\], got shape \(10,\)"),
        (lambda zs, zt, y: (zs, zt[:, :9], y), ValueError, r"teacher_logits must have the shape of student_logits \(4, 10\), got \(4, 9\)"),
        (lambda zs, zt, y: (zs[:, :1], zt[:, :1], y), ValueError, r"at least 1 row and 2 classes, got shape \(4, 1\)"),
        (lambda zs, zt, y: (zs.long(), zt, y), TypeError, r"student_logits must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda zs, zt, y: (zs, zt.int(), y), TypeError, r"teacher_logits must be float16, bfloat16, float32 or float64, got torch.int32"),
        (lambda zs, zt, y: (zs, zt.to("meta"), y), ValueError, r"teacher_logits must be on the device of student_logits \(cpu\), got meta"),
        (lambda zs, zt, y: (zs.tolist(), zt, y), TypeError, r"student_logits must be a torch.Tensor, got list"),
    ],
)
def test_bad_logits(inputs, loss, change, error, message):
    with pytest.raises(error, match=message):
        LOSSES[loss](*change(*inputs))


@pytest.mark.parametrize("loss", ["ldrld", "dkd"])
@pytest.mark.parametrize(
    "bad_target,error,message",
    [
        (torch.tensor([0, 1, 2, 10]), ValueError, r"target must hold class indices in 0\.\.9, found 10"),
        (torch.tensor([0, -1, 2, 3]), ValueError, r"target must hold class indices in 0\.\.9, found -1"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, r"target must be an integer tensor of class indices, got torch.float32"),
        (torch.tensor([0, 1, 2]), ValueError, r"target must have shape \(4,\), got \(3,\)"),
        (torch.tensor([[0, 1, 2, 3]]), ValueError, r"target must have shape \(4,\), got \(1, 4\)"),
        ([0, 1, 2, 3], TypeError, r"target must be a torch.Tensor of class indices, got list"),
        (torch.tensor([0, 1, 2, 3], device="meta"), ValueError, r"target must be on the device of student_logits \(cpu\), got meta"),
    ],
)
def test_bad_target(inputs, loss, bad_target, error, message):
    student, teacher, _ = inputs
    with pytest.raises(error, match=message):
        LOSSES[loss](student, teacher, bad_target)


@pytest.mark.parametrize("top_d", [0, 11, -1, 2.0, True])
def test_bad_top_d(inputs, top_d):
    with pytest.raises(ValueError, match=rf"top_d must be an integer in 1\.\.10 \(the classes\), got {top_d!r}"):
        ldrld_loss(*inputs, top_d=top_d)


def test_top_d_above_triton_limit():
    student, teacher, target = random_logits(2, 40, seed=32)
    ldrld_loss(student, teacher, target, top_d=33, backend="torch")  # fine without the kernel
    with pytest.raises(ValueError, match="top_d must be at most 32 for the triton backend, got 33"):
        ldrld_loss(student, teacher, target, top_d=33, backend="triton")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [0, -1.0, "4", None, float("inf"), float("nan")])
def test_bad_temperature(inputs, loss, temperature):
    with pytest.raises(ValueError, match=rf"temperature must be a positive number, got {temperature!r}"):
        LOSSES[loss](*inputs, temperature=temperature)


def test_a_number_of_the_wrong_type_is_named():
    """A value that looks right but is not a number (a tensor, a string) is named by its type."""
    student, teacher, target = random_logits(2, 10, seed=33)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got tensor\(4\.\) "
                                         r"\(a Tensor: give a Python or numpy number\)"):
        ldrld_loss(student, teacher, target, temperature=torch.tensor(4.0))
    with pytest.raises(ValueError, match=r"top_d must be .*, got '5' \(a str: give a Python or "
                                         r"numpy number\)"):
        ldrld_loss(student, teacher, target, top_d="5")


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_reduction_and_backend(inputs, loss):
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        LOSSES[loss](*inputs, reduction="avg")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch', 'reference'\), got 'cuda'"):
        LOSSES[loss](*inputs, backend="cuda")


# Every weight, decay and epsilon of the losses (>= 0), and HCD's margin theta (any sign).
NON_NEGATIVE = [("ldrld", name) for name in ("alpha", "beta", "ce_weight", "irw_eps", "erd_scale",
                                             "erd_decay")] + [
    ("dkd", "alpha"), ("dkd", "beta")] + [
    ("hcd", name) for name in ("w_gt", "w_sdd", "w_ol", "lam_s", "lam_t")]


def loss_with_option(inputs, loss):
    student, teacher, target = inputs
    return {"ldrld": lambda **o: ldrld_loss(student, teacher, target, **o),
            "dkd": lambda **o: dkd_loss(student, teacher, target, **o),
            "hcd": lambda **o: hcd_logit_loss(torch.zeros(4, 40), teacher, student, target,
                                              **o)}[loss]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", None])
@pytest.mark.parametrize("loss,weight", [("ldrld", "alpha"), ("ldrld", "erd_decay"),
                                         ("dkd", "beta"), ("hcd", "w_ol"), ("hcd", "theta")])
def test_weights_must_be_finite_numbers(inputs, loss, weight, value):
    """A NaN or infinite weight would make every loss value NaN: refused by name."""
    expected = "a finite number" if weight == "theta" else "a finite number >= 0"
    with pytest.raises(ValueError, match=rf"^{weight} must be {expected}, got {value!r}"):
        loss_with_option(inputs, loss)(**{weight: value})


@pytest.mark.parametrize("loss,weight", NON_NEGATIVE, ids=["-".join(case) for case in NON_NEGATIVE])
def test_negative_weights_are_refused(inputs, loss, weight):
    """A negative weight trains away from the teacher (``--dkd-beta -1`` trained to 47% where CE
    scored 99%); a negative decay or epsilon makes the rank weights grow or divide by zero
    (``irw_eps=-1`` gave an infinite loss). Zero switches a term off and is allowed."""
    with pytest.raises(ValueError, match=rf"^{weight} must be a finite number >= 0, got -1.0"):
        loss_with_option(inputs, loss)(**{weight: -1.0})
    assert torch.isfinite(loss_with_option(inputs, loss)(**{weight: 0.0}))


def test_auto_backend_and_environment_override(monkeypatch):
    cpu_logits = torch.zeros(2, 3)
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert requested_backend("auto") == "auto"
    assert not runs_triton("auto", cpu_logits)  # the op's device dispatch: torch on CPU
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert requested_backend("auto") == "reference"
    assert requested_backend("torch") == "torch"  # an explicit choice wins
    monkeypatch.setenv("FASTKD_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"FASTKD_BACKEND must be one of .*, got 'fast'"):
        requested_backend("auto")


@pytest.mark.parametrize("call", [
    lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), backend="triton"),
    lambda: torch.ops.fastkd.kd(torch.zeros(2, 3), torch.zeros(2, 3), 4.0, False, "triton"),
], ids=["loss", "op"])
def test_triton_on_cpu_needs_the_interpreter(monkeypatch, call):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors .*got logits on cpu"):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_gradient_with_retained_graph(backend):
    """The fused paths scale their saved gradient in place only when the graph is freed after
    the pass: with retain_graph every backward gets the same gradient."""
    student = torch.randn(3, 5, requires_grad=True)
    shared = torch.randn(3, 10, requires_grad=True)
    loss = hcd_logit_loss(shared, torch.randn(3, 5), student, torch.tensor([0, 4, 2]),
                          num_sub=2, backend=backend)
    first = torch.autograd.grad(loss, (shared, student), retain_graph=True)
    second = torch.autograd.grad(loss, (shared, student), retain_graph=True)
    loss.backward()
    for a, b, c in zip(first, second, (shared.grad, student.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_compiled_loss_skips_the_label_check():
    """Under torch.compile the CPU label-range check (a graph break) is left out; eager keeps it."""
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    target = torch.tensor([0, 5, 1, 2])
    compiled = torch.compile(ldrld_loss, fullgraph=True, backend="eager")  # dynamo alone
    eager = ldrld_loss(student, teacher, target, top_d=3, backend="torch")
    torch.testing.assert_close(compiled(student, teacher, target, top_d=3, backend="torch"), eager)


def test_auto_backend_can_prefer_torch(monkeypatch):
    """Where triton was measured slower (HCD's streamed rows), auto takes torch even on CUDA."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    logits = torch.zeros(2, 3)
    assert runs_triton("auto", logits)
    assert not runs_triton("auto", logits, triton_is_faster=False)
    assert runs_triton("triton", logits, triton_is_faster=False)
    assert not runs_triton("torch", logits)


def test_numpy_scalars_are_numbers(inputs):
    """numpy's scalars (a value read from an array, a config parsed with numpy) are accepted
    where a number is, and give the loss of the Python number."""
    student, teacher, target = inputs
    assert torch.equal(kd_loss(student, teacher, temperature=np.float32(2)),
                       kd_loss(student, teacher, temperature=2.0))
    assert torch.equal(ldrld_loss(student, teacher, target, top_d=np.int64(3), alpha=np.float64(2)),
                       ldrld_loss(student, teacher, target, top_d=3, alpha=2.0))
    shared = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        hcd_logit_loss(shared, teacher, student, target, num_sub=np.int32(4),
                       label_smoothing=np.float32(0.25)),
        hcd_logit_loss(shared, teacher, student, target, num_sub=4, label_smoothing=0.25))
    with pytest.raises(ValueError, match=r"top_d must be an integer in 1\.\.10 .*got np\.float64"):
        ldrld_loss(student, teacher, target, top_d=np.float64(3))
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got np\.True_"):
        kd_loss(student, teacher, temperature=np.bool_(True))
