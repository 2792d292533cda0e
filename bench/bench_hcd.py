"""HCD per-stage logit loss speed and memory at its default options (``fastkd.methods.hcd.HCD``:
num_sub = 4) with label smoothing 0.1, providers side by side: ``pytest bench/bench_hcd.py``.

``reference`` is the spec written term by term, one sub-logit at a time (autograd).
"""

import pytest
import torch
from harness import DEVICE, LossSuite, check_provider, random_inputs, time_loss

from fastkd import hcd_logit_loss
from fastkd.methods.hcd import HCD

NUM_SUB = HCD.num_sub
LABEL_SMOOTHING = 0.1


def hcd_inputs(batch, classes, dtype, seed=0):
    """Shared logits [B, n*C], teacher, student logits and labels on DEVICE."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    shared = torch.randn(batch, NUM_SUB * classes, generator=generator, device=DEVICE)
    student, teacher, target = random_inputs(batch, classes, dtype, seed=seed + 1)
    return shared.to(dtype), student, teacher, target


def hcd_loss(shared, student, teacher, target, backend="auto"):
    """``hcd_logit_loss`` with the differentiable inputs (shared, student) first."""
    return hcd_logit_loss(shared, teacher, student, target, label_smoothing=LABEL_SMOOTHING,
                          backend=backend)


SUITE = LossSuite(
    name="hcd",
    loss=hcd_loss,
    make_inputs=hcd_inputs,
    num_differentiable=2,
    providers=("reference", "torch", "compiled", "triton"),
    # Reads shared, teacher and student logits; writes the shared and student gradients.
    floor_elements=lambda batch, classes: ((NUM_SUB + 2) * batch * classes,
                                           (NUM_SUB + 1) * batch * classes),
)


@pytest.mark.parametrize("provider", SUITE.timed_providers())
def bench_hcd(benchmark, provider, shape, dtype, mode):
    time_loss(benchmark, SUITE, provider, shape, dtype, mode)


@pytest.mark.parametrize("provider", SUITE.providers)
def test_hcd_provider_matches_reference(provider):
    check_provider(SUITE, provider)
