"""What the loss benchmarks share: the shape matrix, the providers, timing and memory.

A ``LossSuite`` names one loss and how to make its inputs. Its providers are the loss's backends
(``reference``, ``torch``, ``triton``) plus:
- ``compiled``: ``torch.compile(loss, dynamic=True)`` with the default ``backend="auto"``: the
  loss as a compiled step holds it, one ``torch.ops.fastkd`` op (on CUDA its Triton kernel; the
  vectorised torch code on CPU), one graph per dtype and mode shared by all shapes; the first
  call (the compile) is recorded apart as ``first_call_s``;
- ``cross-entropy``: ``F.cross_entropy`` of student logits of the same shape and dtype, the host
  cost of the cheapest loss a training step has, for comparison;
- ``copy-floor`` (CUDA only): one device copy moving the bytes the fused kernel must move at
  least (each input read once, each gradient written once), the memory-bandwidth limit;
- ``graph-replay`` and ``empty-graph`` (CUDA only): the loss (``backend="auto"``) captured in a
  CUDA graph, and a graph with nothing in it: the host time of one ``replay()`` each (the timer
  does not wait for the GPU here), what a captured training step pays for the loss.

On CUDA, ``peak_extra_mib`` records the memory one call allocates beyond its inputs at its peak
(the gradient included), next to ``gradient_mib``, and ``device_time_s`` the GPU time of one
call (its kernels' summed durations): the pytest-benchmark median is the host's wall time per
call, which small calls spend mostly launching.
"""

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
# The default on CPU stays under 10 minutes (the compiles take most of it); --bench-matrix=full
# is the default on CUDA.
MATRICES = {
    "small": {"shapes": [(64, 100), (256, 1000)], "dtypes": ["fp32"], "modes": list(MODES)},
    # B in {64, 256, 1024} x C in {100, 1000, 21843}, the headline shapes first: they run first,
    # and the first shape is the one torch.compile tunes its dynamic-shape kernels for.
    "full": {"shapes": [(256, 1000), (1024, 21843), (64, 100), (64, 1000), (64, 21843),
                        (256, 100), (256, 21843), (1024, 100), (1024, 1000)],
             "dtypes": list(DTYPES), "modes": list(MODES)},
    # The shapes the targets are stated at, forward + backward (bench/gpu_check.sh).
    "targets": {"shapes": [(256, 1000), (1024, 21843)], "dtypes": list(DTYPES),
                "modes": ["fwd+bwd"]},
}
# Providers every suite has besides its own (see the module docstring); CUDA-only ones skip
# elsewhere.
COMMON_PROVIDERS = ("cross-entropy", "copy-floor", "graph-replay", "empty-graph")
CUDA_ONLY = ("triton", "copy-floor", "graph-replay", "empty-graph")
CHECK_SHAPE = (6, 37)  # the tiny correctness check of every provider


@dataclass(frozen=True)
class LossSuite:
    """One loss to time. ``make_inputs(batch, classes, dtype)`` returns the loss's positional
    tensors, the first ``num_differentiable`` of which get gradients; ``loss(*inputs, backend=)``
    returns the mean loss (a plain function: see ``compiled_loss``); ``floor_elements(batch,
    classes)`` counts the elements the fused kernel reads in forward and additionally writes in
    backward."""

    name: str
    loss: Callable
    make_inputs: Callable
    num_differentiable: int
    providers: tuple
    floor_elements: Callable

    def timed_providers(self):
        return (*self.providers, *COMMON_PROVIDERS)

    def run(self, provider, inputs):
        if provider == "compiled":
            return compiled_loss(self.loss)(*inputs)
        return self.loss(*inputs, backend=provider)


@functools.cache
def compiled_loss(loss):
    """``loss`` compiled, run with its default backend. ``loss`` must be a plain function: dynamo
    keeps its compile cache (and recompile limit, 8) per code object, and compiles every partial
    or other callable object through one shared wrapper, where the suites would evict each
    other."""
    return torch.compile(loss, dynamic=True)


def random_inputs(batch, classes, dtype, seed=0):
    """Student logits, teacher logits (both ~N(0, 3^2)) and labels on DEVICE."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, device=DEVICE) * 3
    teacher = torch.randn(batch, classes, generator=generator, device=DEVICE) * 3
    target = torch.randint(0, classes, (batch,), generator=generator, device=DEVICE)
    return student.to(dtype), teacher.to(dtype), target


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synchronized_timer():
    """perf_counter after the device has finished: a round of many calls is timed end to end."""
    synchronize()
    return time.perf_counter()


def loss_step(suite, provider, inputs, differentiable, run=None):
    """A callable running one forward of the mean loss (``suite.run(provider, inputs)``, or
    ``run(inputs)``), and its backward to ``differentiable`` (the leading inputs, or none for
    forward only)."""
    for tensor in differentiable:
        tensor.requires_grad_()
    run = run or functools.partial(suite.run, provider)

    def step():
        for tensor in differentiable:
            tensor.grad = None
        loss = run(inputs)
        if differentiable:
            loss.backward()

    return step


def copy_floor_step(suite, shape, dtype, mode):
    """One copy moving as many bytes as the fused kernel's minimum traffic (a copy reads and
    writes each element, so it copies half the elements)."""
    read, written = suite.floor_elements(*shape)
    elements = (read + (written if mode == "fwd+bwd" else 0)) // 2
    source = torch.randn(elements, device=DEVICE).to(dtype)
    destination = torch.empty_like(source)
    return functools.partial(destination.copy_, source)


def cross_entropy_step(shape, dtype, mode):
    """``F.cross_entropy`` of student logits of ``shape`` (and its backward for fwd+bwd)."""
    student, _, target = random_inputs(*shape, dtype)
    return loss_step(None, None, (student, target), (student,) if mode == "fwd+bwd" else (),
                     run=lambda inputs: F.cross_entropy(*inputs))


def captured_graph(step):
    """``step`` captured in a CUDA graph, after warm-up calls on a side stream (as torch's CUDA
    graph recipe does; ``step=None`` captures an empty graph). Returns the graph's ``replay`` and
    what the captured call returned (its tensors are the outputs each replay rewrites)."""
    output = None
    if step is not None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if step is not None:
            output = step()
    torch.cuda.synchronize()
    return graph.replay, output


def time_replay(benchmark, replay):
    """Host time of one ``replay()``: each round one call, after the GPU has drained (so the
    launch queue never fills), with a timer that does not wait for the GPU."""
    benchmark._timer = time.perf_counter
    benchmark.pedantic(replay, setup=synchronize, rounds=500, iterations=1, warmup_rounds=20)


def peak_extra_mib(step):
    """Memory one call allocates beyond what is live before it, at its peak (CUDA). The caller
    frees the previous call's gradients first."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def device_seconds(step, calls=3):
    """GPU time of one call: the summed durations of the kernels (and copies) it runs, read with
    torch.profiler. Free of the host's launch overhead, which dominates small calls."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return sum(event.device_time_total for event in profile.events()
               if event.device_type == torch.autograd.DeviceType.CUDA) / calls / 1e6


def time_loss(benchmark, suite, provider, shape, dtype, mode):
    """Time one provider on one case with pytest-benchmark, after a first (warm-up) call.

    Past the time in ``FASTKD_BENCH_DEADLINE`` (seconds since the epoch) the remaining cases are
    skipped, so a time-limited run still ends normally and saves what it measured.
    """
    deadline = os.environ.get("FASTKD_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("past FASTKD_BENCH_DEADLINE")
    if DEVICE != "cuda" and provider in CUDA_ONLY:
        pytest.skip(f"{provider} is timed on CUDA only (interpreter timings mean nothing; "
                    "the copy floor and CUDA graphs are GPU measures)")
    benchmark.group = f"{suite.name} {mode} {dtype} {DEVICE}"
    differentiable = ()
    if provider == "empty-graph":
        return time_replay(benchmark, captured_graph(None)[0])
    if provider == "copy-floor":
        step = copy_floor_step(suite, shape, DTYPES[dtype], mode)
    elif provider == "cross-entropy":
        step = cross_entropy_step(shape, DTYPES[dtype], mode)
    else:
        inputs = suite.make_inputs(*shape, DTYPES[dtype])
        differentiable = inputs[:suite.num_differentiable] if mode == "fwd+bwd" else ()
        step = loss_step(suite, "auto" if provider == "graph-replay" else provider, inputs,
                         differentiable)
        benchmark.extra_info["gradient_mib"] = sum(
            tensor.numel() * tensor.element_size() for tensor in differentiable) / 2**20
    if provider == "graph-replay":
        return time_replay(benchmark, captured_graph(step)[0])
    start = synchronized_timer()
    step()
    benchmark.extra_info["first_call_s"] = synchronized_timer() - start
    if DEVICE == "cuda":
        for tensor in differentiable:
            tensor.grad = None
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(step)
        try:
            benchmark.extra_info["device_time_s"] = device_seconds(step)
        except RuntimeError as error:  # no profiler (CUPTI) on this machine: keep the timing
            benchmark.extra_info["device_time_error"] = str(error)[:200]
    benchmark(step)


def check_provider(suite, provider):
    """The provider's loss and gradients match the reference's on a tiny fp32 case."""
    inputs = suite.make_inputs(*CHECK_SHAPE, torch.float32)
    results = []
    for name in (provider, "reference"):
        copies = [tensor.detach().clone() for tensor in inputs]
        differentiable = copies[:suite.num_differentiable]
        for tensor in differentiable:
            tensor.requires_grad_()
        loss = suite.run(name, copies)
        loss.backward()
        results.append([loss.detach(), *(tensor.grad for tensor in differentiable)])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
