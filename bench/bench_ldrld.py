"""LDRLD speed and memory at its default options (``fastkd.methods.ldrld.LDRLD``: top_d = 7, the
authors' CIFAR-100 settings), providers side by side: ``pytest bench/bench_ldrld.py``.

``reference`` is the authors' formulation (one masked full-width softmax per group: 21 pairs and
the top set at top_d = 7), what users of the published code run today.
"""

import pytest
from harness import LossSuite, check_provider, random_inputs, time_loss

from fastkd import ldrld_loss

SUITE = LossSuite(
    name="ldrld",
    loss=ldrld_loss,
    make_inputs=random_inputs,
    num_differentiable=1,
    providers=("reference", "torch", "compiled", "triton"),
    # Reads student and teacher logits; writes the student gradient.
    floor_elements=lambda batch, classes: (2 * batch * classes, batch * classes),
)


@pytest.mark.parametrize("provider", SUITE.timed_providers())
def bench_ldrld(benchmark, provider, shape, dtype, mode):
    time_loss(benchmark, SUITE, provider, shape, dtype, mode)


@pytest.mark.parametrize("provider", SUITE.providers)
def test_ldrld_provider_matches_reference(provider):
    check_provider(SUITE, provider)
