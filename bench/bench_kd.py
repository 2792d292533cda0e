"""KD and DKD speed and memory, providers side by side: ``pytest bench/bench_kd.py``.

KD's reference is the plain formula with autograd; DKD's is the authors' masked formulation.
"""


import pytest
from harness import LossSuite, check_provider, random_inputs, time_loss

from fastkd import dkd_loss, kd_loss


def kd_inputs(batch, classes, dtype):
    return random_inputs(batch, classes, dtype)[:2]


# Both read student and teacher logits and write the student gradient.
def logit_pair_elements(batch, classes):
    return 2 * batch * classes, batch * classes


KD = LossSuite(name="kd", loss=kd_loss, make_inputs=kd_inputs, num_differentiable=1,
               providers=("reference", "torch", "compiled", "triton"),
               floor_elements=logit_pair_elements)
DKD = LossSuite(name="dkd", loss=dkd_loss, make_inputs=random_inputs, num_differentiable=1,
                providers=("reference", "torch", "compiled", "triton"),
                floor_elements=logit_pair_elements)


@pytest.mark.parametrize("provider", KD.timed_providers())
def bench_kd(benchmark, provider, shape, dtype, mode):
    time_loss(benchmark, KD, provider, shape, dtype, mode)


@pytest.mark.parametrize("provider", DKD.timed_providers())
def bench_dkd(benchmark, provider, shape, dtype, mode):
    time_loss(benchmark, DKD, provider, shape, dtype, mode)


@pytest.mark.parametrize("suite,provider", [(suite, provider) for suite in (KD, DKD)
                                            for provider in suite.providers],
                         ids=lambda value: getattr(value, "name", value))
def test_provider_matches_reference(suite, provider):
    check_provider(suite, provider)
