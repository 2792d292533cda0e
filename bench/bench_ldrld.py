"""LDRLD speed, providers side by side in one run: ``pytest bench/``.

reference = the authors' masked full-width softmax per group (what users of the published code
run), torch = the vectorised backend, triton = the fused kernel (CUDA only: interpreter timings
mean nothing). Forward + backward of the mean loss, top_d = 7.
"""

import pytest
import torch

from fastkd import ldrld_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 1000)]  # (batch, classes)
PROVIDERS = ["reference", "torch", "triton"]


def make_inputs(batch, num_classes, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(batch, num_classes, generator=generator) * 3
    teacher = torch.randn(batch, num_classes, generator=generator) * 3
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype), target.to(DEVICE)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"B{shape[0]}-C{shape[1]}")
def bench_ldrld_forward_backward(benchmark, provider, shape):
    if provider == "triton" and DEVICE != "cuda":
        pytest.skip("triton is timed on CUDA only (interpreter timings mean nothing)")
    student, teacher, target = make_inputs(*shape)
    student.requires_grad_()
    benchmark.group = f"ldrld fwd+bwd {shape[0]}x{shape[1]} top_d=7 {DEVICE}"

    def step():
        student.grad = None
        ldrld_loss(student, teacher, target, top_d=7, backend=provider).backward()
        synchronize()

    benchmark(step)
