import pytest
import torch
from harness import DEVICE, MATRICES, synchronized_timer


def pytest_addoption(parser):
    parser.addoption("--bench-matrix", choices=sorted(MATRICES),
                     default="full" if DEVICE == "cuda" else "small",
                     help="loss benchmark shapes/dtypes/modes: 'small' (the CPU default) or "
                          "'full' (B in 64, 256, 1024 x C in 100, 1000, 21843, fp32 and bf16)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Timings run alone, in one process: naming bench/ (``pytest bench/``) turns off the
    pytest-xdist workers that pyproject's ``-n auto`` starts for the test suite, under which
    pytest-benchmark would time nothing. (Called before xdist's own hook: conftest hooks run
    first.)"""
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.option.numprocesses, config.option.dist = 0, "no"


def pytest_generate_tests(metafunc):
    """Loss benchmarks take ``shape``, ``dtype`` and ``mode`` from the chosen matrix."""
    matrix = MATRICES[metafunc.config.getoption("bench_matrix")]
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", matrix["shapes"],
                             ids=lambda shape: f"B{shape[0]}-C{shape[1]}")
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", matrix["dtypes"])
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", matrix["modes"])


def pytest_collection_modifyitems(config, items):
    """A plain ``pytest`` (the test suite, collected from testpaths) runs the benchmark files'
    correctness checks but not the timings: those run when bench/ is named."""
    if getattr(config, "args_source", None) != pytest.Config.ArgsSource.TESTPATHS:
        return
    timings = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    if timings:
        config.hook.pytest_deselected(items=timings)
        items[:] = [item for item in items if item not in timings]


@pytest.fixture
def benchmark(benchmark):
    """pytest-benchmark's fixture with a timer that waits for the device, so a round of calls is
    timed from the host end to end. (pytest-benchmark has no public way to set the timer from a
    conftest; its command-line option needs an importable dotted path.)"""
    benchmark._timer = synchronized_timer
    return benchmark


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the machine in every saved result: torch/triton versions and the GPU, if any."""
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
