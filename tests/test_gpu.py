"""The compiled Triton kernels on CUDA against the float64 references: larger shapes than the
CPU (interpreter) tests, every input dtype, and the kernels' memory use. Run by
``bench/gpu_check.sh``; skipped without a GPU."""

import pytest
import torch
from helpers import assert_close_scaled, random_logits

from fastkd import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss

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
