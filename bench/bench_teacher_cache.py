"""What a teacher cache saves per training step: ``pytest bench/bench_teacher_cache.py``.

One SGD step (forward, loss, backward, update) of a student per teacher (``PAIRS``), side by side
in one table group per pair: CIFAR-scale, student resnet20 at batch 64 on 32x32 inputs, 100
classes, teachers wrn_16_2 and resnet32x4; ImageNet-scale, student resnet18 at batch 8 on
224x224 inputs, 1000 classes, teachers resnet34 and vit_large_patch16_224 (random init, fewer
rounds: vit_large's forward is about 62 G multiply-adds an image). The cases:

- ``ce``: CE alone (``build_distiller("ce", student)``), the floor;
- ``kd-cached``: KD with the teacher's logits given (``teacher_outputs=``), as
  ``--teacher-cache`` runs it: no teacher is built, and the step's rows are gathered from a
  small cache written by ``teacher_cache.write_shard`` (float16, the trainer's default
  ``--cache-dtype``; two shards of ``SHARD_ROWS``, random rows each step) and mapped by
  ``TeacherCache``. The gather is timed inside the step; the trainer does it on a thread while
  the previous step trains, so this is an upper bound of what a cached step costs;
- ``kd-live``: KD with the teacher (eval mode, no gradients) run on every step;
- ``teacher-forward``: the teacher's eval-mode forward pass alone (no gradients), what a cache
  build runs per batch and a cached run no longer does;
- ``cache-rows``: the gather alone (``TeacherCache.rows`` of a batch of random rows), for scale.

kd-cached / ce is what distillation still costs with a cache (the KD loss, the rows); kd-live /
ce adds the teacher's forward pass; teacher-forward / ce is that pass's cost against the
student's step. The cache's values are random: a step's time does not depend on them.

On a CUDA device every pair runs as the trainer runs it there (``--amp --amp-dtype bfloat16
--channels-last``): bf16 autocast, channels-last models and inputs, batch ``CUDA_BATCH``; the
timer waits for the device (bench/conftest.py).
"""

import contextlib
import functools
from typing import NamedTuple

import numpy as np
import pytest
import timm
import torch

import fastkd  # noqa: F401  (registers the CIFAR nets in timm)
from fastkd.distillers import TeacherOutputs, build_distiller
from fastkd.engine import teacher_cache
from fastkd.engine.teacher_cache import SHARD_ROWS, TeacherCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_BATCH = 256  # the GPU check's trainer batch (bench/trainer_e2e.py)


class Pair(NamedTuple):
    student: str
    teacher: str
    batch: int
    classes: int
    size: int
    warmup_rounds: int
    rounds: int

    @property
    def device_batch(self):
        return self.batch if DEVICE == "cpu" else CUDA_BATCH


def autocast():
    """bf16 autocast on CUDA, as the trainer's ``--amp`` runs there; nothing on the CPU."""
    return (torch.autocast("cuda", torch.bfloat16) if DEVICE == "cuda"
            else contextlib.nullcontext())


def on_device(model):
    """``model`` on ``DEVICE``, channels-last on CUDA."""
    model = model.to(DEVICE)
    return model.to(memory_format=torch.channels_last) if DEVICE == "cuda" else model


PAIRS = (Pair("resnet20", "wrn_16_2", 64, 100, 32, 3, 15),
         Pair("resnet20", "resnet32x4", 64, 100, 32, 3, 15),
         Pair("resnet18", "resnet34", 8, 1000, 224, 1, 5),
         Pair("resnet18", "vit_large_patch16_224", 8, 1000, 224, 1, 5))
CASES = ("ce", "kd-cached", "kd-live", "teacher-forward", "cache-rows")
CACHE_SHARDS = 2  # 8192 rows: a step's random rows come from both shards


def write_cache(directory, logits, dtype="float16"):
    """A finished one-view cache of ``logits`` ``[n, C]`` in ``directory`` (the shards as
    ``train/cache_teacher.py`` writes them, a manifest with the fields ``TeacherCache`` reads),
    opened with its files checked."""
    records = [teacher_cache.write_shard(directory, 0, first,
                                         {"logits": logits[first:first + SHARD_ROWS]}, dtype)
               for first in range(0, len(logits), SHARD_ROWS)]
    teacher_cache.write_json(
        directory / teacher_cache.MANIFEST,
        {"format": teacher_cache.FORMAT, "views": 1, "dtype": dtype, "shard_rows": SHARD_ROWS,
         "embedding": None, "num_classes": logits.shape[1], "shards": records})
    cache = TeacherCache(str(directory))
    cache.open_views([0])
    return cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """``caches(classes)``: a cache of random logits for ``classes`` classes, written once."""

    @functools.cache
    def cache(classes):
        generator = torch.Generator().manual_seed(0)
        logits = 3 * torch.randn(CACHE_SHARDS * SHARD_ROWS, classes, generator=generator)
        return write_cache(tmp_path_factory.mktemp("teacher-cache"), logits)

    return cache


def batches_of_slots(rows, batch, seed=0):
    """Endless batches of ``batch`` slots, shuffled epoch after epoch as a training run reads."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(rows)
        for first in range(0, rows - batch + 1, batch):
            yield order[first:first + batch]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: pair.teacher)
def bench_teacher_cache_step(benchmark, caches, pair, case):
    batch = pair.device_batch
    benchmark.group = (f"training step, {pair.student} <- {pair.teacher}, batch {batch}, "
                       f"{pair.size}x{pair.size}, {pair.classes} classes, {DEVICE}")
    benchmark.extra_info["case"] = case
    rounds = dict(rounds=pair.rounds, warmup_rounds=pair.warmup_rounds)
    cache = caches(pair.classes)
    slots = batches_of_slots(CACHE_SHARDS * SHARD_ROWS, batch)

    def read_rows():
        outputs = cache.rows(0, next(slots))
        return TeacherOutputs(outputs.logits.to(DEVICE, non_blocking=True))

    if case == "cache-rows":
        benchmark.pedantic(read_rows, **rounds)
        return

    torch.manual_seed(0)
    images = torch.randn(batch, 3, pair.size, pair.size, device=DEVICE)
    if DEVICE == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, pair.classes, (batch,), device=DEVICE)
    teacher = None
    if case in ("kd-live", "teacher-forward"):
        teacher = timm.create_model(pair.teacher, num_classes=pair.classes).eval()
    if case == "teacher-forward":
        teacher = on_device(teacher)

        def forward():
            with torch.no_grad(), autocast():
                teacher(images)

        benchmark.pedantic(forward, **rounds)
        return

    student = timm.create_model(pair.student, num_classes=pair.classes)
    distiller = on_device(build_distiller("ce" if case == "ce" else "kd", student,
                                          teacher)).train()
    assert teacher is None or not teacher.training
    optimizer = torch.optim.SGD(distiller.get_trainable_module().parameters(), lr=0.01)

    def step():
        outputs = read_rows() if case == "kd-cached" else None
        with autocast():
            loss = distiller(images, target, epoch=0.0, teacher_outputs=outputs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    benchmark.pedantic(step, **rounds)


def test_cached_step_matches_live(tmp_path):
    """The kd-cached case computes what kd-live does: with the teacher's own logits in a
    float32 cache, the loss and the student's gradients agree."""
    pair = PAIRS[0]
    torch.manual_seed(0)
    teacher = timm.create_model(pair.teacher, num_classes=pair.classes).eval()
    images = torch.randn(8, 3, pair.size, pair.size)
    target = torch.randint(0, pair.classes, (8,))
    with torch.no_grad():
        logits = teacher(images)
    cache = write_cache(tmp_path, logits, dtype="float32")
    results = []
    for given, outputs in ((teacher, None), (None, cache.rows(0, range(8)))):
        torch.manual_seed(1)
        student = timm.create_model(pair.student, num_classes=pair.classes)
        loss = build_distiller("kd", student, given).train()(images, target, epoch=0.0,
                                                             teacher_outputs=outputs)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in student.parameters()]))
    (live_loss, live_grads), (cached_loss, cached_grads) = results
    torch.testing.assert_close(cached_loss, live_loss)
    for cached, live in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(cached, live)
