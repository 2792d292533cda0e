"""Inputs and comparisons shared by the loss tests, and the bench scripts as modules."""

import importlib.util
import os

import torch

BACKENDS = ("reference", "torch", "triton")
FAST_BACKENDS = ("torch", "triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_logits(batch, num_classes, seed, dtype=torch.float32, scale=3.0):
    """Student logits, teacher logits and labels on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * scale
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype), target.to(DEVICE)


def distinct_logits(batch, num_classes, seed, dtype):
    """Student logits with no ties in any dtype down to bf16 (integers/8 with |k| <= 128), so
    every backend selects the same top-d. Needs num_classes <= 256."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_classes, generator=generator) for _ in range(batch)]
    student = (torch.stack(rows).to(torch.float64) - num_classes // 2) / 8
    teacher = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype), target.to(DEVICE)


def loss_and_grad(loss_fn, student, teacher, target=None, **options):
    """Per-row loss, detached per-row parts, and d(sum of rows)/d student, for one backend."""
    student = student.detach().clone().requires_grad_()
    args = (student, teacher) if target is None else (student, teacher, target)
    result = loss_fn(*args, reduction="none", **options)
    rows, parts = result if isinstance(result, tuple) else (result, {})
    rows.sum().backward()
    return rows.detach(), parts, student.grad


def assert_close_scaled(actual, expected, rtol, what="", atol_floor=0.0):
    """Elementwise |actual - expected| <= rtol * max|expected| + atol_floor.

    Errors are taken relative to the tensor's scale, so near-zero gradient entries are not held to
    a relative bound they cannot meet. ``atol_floor`` is for KL values near zero: fp32
    log-probabilities carry ~1e-7 absolute error and a KL is the small difference of O(1) terms,
    so its fp32 absolute error stays near T^2 * 1e-7 however small the KL itself is.
    """
    expected = expected.to(actual.device, torch.float64)
    actual = actual.to(torch.float64)
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale + atol_floor,
                               msg=lambda m: f"{what}: {m}")


def load_bench_script(name):
    """``bench/<name>.py`` as a module (bench/ is scripts, not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
