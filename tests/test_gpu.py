"""The compiled Triton kernels on CUDA against the float64 references: larger shapes than the
CPU (interpreter) tests, every input dtype, and the kernels' memory use; the fused losses in a
CUDA graph and in compiled steps. Run by ``bench/gpu_check.sh``; skipped without a GPU."""

import os
import sys

import pytest
import torch
from helpers import assert_close_scaled, random_logits

from fastkd import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
from harness import captured_graph  # noqa: E402  (bench/ is not a package)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (tolerance relative to the largest reference value) per input dtype: the kernels accumulate in
# fp32; the gradient is rounded to the input dtype.
DTYPES = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Rows in one block, rows streamed in blocks (C > 4096), a batch of one and a wide batch.
SHAPES = [(1, 8), (257, 1000), (1024, 100), (64, 21843), (8, 50000)]
TOP_D = 7


def ldrld_inputs(batch, classes, dtype, seed):
    """Random logits whose top_d + 1 student classes have distinct values in every dtype
    (16, 15.5, ...), above any N(0, 9) sample here: all backends then rank the same classes."""
    student, teacher, target = random_logits(batch, classes, seed, dtype)
    leaders = min(TOP_D + 1, classes)
    generator = torch.Generator().manual_seed(seed)
    columns = torch.stack([torch.randperm(classes, generator=generator)[:leaders]
                           for _ in range(batch)]).to(student.device)
    values = 16.0 - 0.5 * torch.arange(leaders, device=student.device, dtype=dtype)
    student.scatter_(1, columns, values.expand(batch, leaders).contiguous())
    return student, teacher, target


def triton_and_reference(loss, inputs, num_differentiable):
    """Per-row loss and gradients of the triton backend (inputs as given) and of the reference
    on the same values in float64."""
    results = []
    for backend, cast in (("triton", lambda x: x), ("reference", lambda x: x.double())):
        tensors = [cast(x.detach().clone()) if x.is_floating_point() else x for x in inputs]
        for tensor in tensors[:num_differentiable]:
            tensor.requires_grad_()
        rows = loss(*tensors, reduction="none", backend=backend)
        rows.sum().backward()
        results.append([rows.detach(), *(t.grad for t in tensors[:num_differentiable])])
    return results


def assert_matches(results, inputs, dtype):
    (rows, *grads), (ref_rows, *ref_grads) = results
    assert_close_scaled(rows, ref_rows, 1e-5, "loss", atol_floor=1e-5)
    for grad, ref_grad, tensor in zip(grads, ref_grads, inputs):
        assert grad.dtype == dtype and grad.shape == tensor.shape
        assert torch.isfinite(grad).all()
        assert_close_scaled(grad, ref_grad, DTYPES[dtype], "gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ldrld(shape, dtype):
    inputs = ldrld_inputs(*shape, dtype, seed=shape[0] + shape[1])
    loss = lambda *x, **o: ldrld_loss(*x, top_d=min(TOP_D, shape[1] - 1), **o)  # noqa: E731
    assert_matches(triton_and_reference(loss, inputs, 1), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kd_and_dkd(shape, dtype):
    inputs = random_logits(*shape, seed=shape[0] * 7 + shape[1], dtype=dtype)
    assert_matches(triton_and_reference(kd_loss, inputs[:2], 1), inputs, dtype)
    assert_matches(triton_and_reference(dkd_loss, inputs, 1), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 8), (257, 1000), (64, 21843)], ids=str)
def test_hcd(shape, dtype):
    batch, classes = shape
    student, teacher, target = random_logits(batch, classes, seed=batch + classes, dtype=dtype)
    shared = random_logits(batch, 4 * classes, seed=classes, dtype=dtype, scale=1.0)[0]

    def loss(shared, student, teacher, target, **options):
        return hcd_logit_loss(shared, teacher, student, target, num_sub=4, label_smoothing=0.1,
                              **options)

    inputs = (shared, student, teacher, target)
    assert_matches(triton_and_reference(loss, inputs, 2), inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", [ldrld_loss, dkd_loss], ids=lambda f: f.__name__)
def test_forward_and_backward_allocate_one_gradient(loss, dtype):
    """Beyond its inputs a fused loss allocates the gradient it returns and per-row outputs."""
    student, teacher, target = random_logits(1024, 21843, seed=5, dtype=dtype)
    student.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss(student, teacher, target, backend="triton").backward()
    torch.cuda.synchronize()
    gradient = student.numel() * student.element_size()
    assert torch.cuda.max_memory_allocated() - before <= gradient + 2**20


def each_fused_loss(student, shared, teacher, target):
    """Every public fused loss at its defaults, summed (HCD with two sub-logits)."""
    return (ldrld_loss(student, teacher, target) + kd_loss(student, teacher)
            + dkd_loss(student, teacher, target)
            + hcd_logit_loss(shared, teacher, student, target, num_sub=2, label_smoothing=0.1))


def fused_inputs(dtype=torch.float32):
    student, teacher, target = ldrld_inputs(64, 1000, dtype, seed=11)
    shared = random_logits(64, 2000, seed=12, dtype=dtype, scale=1.0)[0]
    return student, shared, teacher, target


def loss_and_grads(step, student, shared, teacher, target):
    student = student.detach().clone().requires_grad_()
    shared = shared.detach().clone().requires_grad_()
    loss = step(student, shared, teacher, target)
    loss.backward()
    return loss.detach(), student.grad, shared.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replay_matches_eager(dtype):
    """Forward + backward of every fused loss captured in one CUDA graph: a replay on new inputs
    (copied into the captured buffers) gives eager's loss and gradients on those inputs."""
    captured = [tensor.clone() for tensor in fused_inputs(dtype)]
    student, shared = captured[0].requires_grad_(), captured[1].requires_grad_()

    def step():
        student.grad = shared.grad = None
        loss = each_fused_loss(*captured)
        loss.backward()
        return loss

    replay, loss = captured_graph(step)
    fresh = fused_inputs(dtype)
    fresh = (fresh[0] * 0.5, fresh[1] + 1.0, fresh[2].flip(1), fresh[3].flip(0))
    with torch.no_grad():
        for buffer, value in zip(captured, fresh):
            buffer.copy_(value)
    replay()
    torch.cuda.synchronize()
    expected = loss_and_grads(each_fused_loss, *fresh)
    for actual, wanted in zip((loss, student.grad, shared.grad), expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


def test_compiled_step_with_each_fused_loss():
    """torch.compile(fullgraph=True) (inductor) of a step calling every fused loss: no graph
    break, and eager's loss and gradients."""
    inputs = fused_inputs()
    compiled = torch.compile(each_fused_loss, fullgraph=True)
    for actual, wanted in zip(loss_and_grads(compiled, *inputs),
                              loss_and_grads(each_fused_loss, *inputs)):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


def test_compiled_resnet18_step_with_ldrld_has_no_graph_break():
    """A ResNet-18 distillation step with LDRLD (bf16 autocast, channels-last): its forward and
    loss traced whole by dynamo with fullgraph=True, which fails on any graph break, and AOT
    autograd (backend aot_eager, no code generation, to keep the test short) for the backward;
    loss and gradients match eager's."""
    import timm

    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=100).cuda()
    student = student.to(memory_format=torch.channels_last)
    images = torch.randn(32, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    teacher_logits = torch.randn(32, 100, device="cuda") * 3
    target = torch.randint(0, 100, (32,), device="cuda")

    def distillation_loss(images, teacher_logits, target):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            student_logits = student(images)
        return ldrld_loss(student_logits, teacher_logits, target)

    results = []
    for step in (torch.compile(distillation_loss, fullgraph=True, backend="aot_eager"),
                 distillation_loss):
        student.zero_grad(set_to_none=True)
        loss = step(images, teacher_logits, target)
        loss.backward()
        results.append((loss.detach(), student.fc.weight.grad))
    for actual, wanted in zip(*results):
        torch.testing.assert_close(actual, wanted, rtol=2e-2, atol=2e-2)
