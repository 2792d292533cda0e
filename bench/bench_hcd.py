"""HCD per-stage logit loss speed, providers side by side in one run: ``pytest bench/``.

reference = the spec written term by term, one sub-logit at a time (autograd), torch = the
vectorised closed-form backend, triton = the fused kernel (CUDA only). Forward + backward of the
mean loss w.r.t. the shared and student logits, num_sub = 4, label smoothing 0.1.
"""

import pytest
import torch

from fastkd import hcd_logit_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 1000)]  # (batch, classes)
PROVIDERS = ["reference", "torch", "triton"]
NUM_SUB = 4


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"B{shape[0]}-C{shape[1]}")
def bench_hcd_forward_backward(benchmark, provider, shape):
    if provider == "triton" and DEVICE != "cuda":
        pytest.skip("triton is timed on CUDA only (interpreter timings mean nothing)")
    batch, num_classes = shape
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(batch, NUM_SUB * num_classes, generator=generator).to(DEVICE)
    teacher = (torch.randn(batch, num_classes, generator=generator) * 3).to(DEVICE)
    student = (torch.randn(batch, num_classes, generator=generator) * 3).to(DEVICE)
    target = torch.randint(0, num_classes, (batch,), generator=generator).to(DEVICE)
    shared.requires_grad_()
    student.requires_grad_()
    benchmark.group = f"hcd fwd+bwd {batch}x{num_classes} num_sub={NUM_SUB} {DEVICE}"

    def step():
        shared.grad = student.grad = None
        hcd_logit_loss(shared, teacher, student, target, num_sub=NUM_SUB, label_smoothing=0.1,
                       backend=provider).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
