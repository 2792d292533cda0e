"""What a teacher cache saves per training step: ``pytest bench/bench_teacher_cache.py``.

One SGD step (forward, loss, backward, update) of student resnet20 at batch 64 on 32x32 inputs,
100 classes, per teacher (wrn_16_2, resnet32x4), side by side in one table group per pair:

- ``ce``: CE alone (``build_distiller("ce", student)``), the floor;
- ``kd-cached``: KD with the teacher's logits given (``teacher_outputs=``), as
  ``--teacher-cache`` runs it: no teacher is built, and the step's rows are gathered from a
  small cache written by ``teacher_cache.write_shard`` (float16, the trainer's default
  ``--cache-dtype``; two shards of ``SHARD_ROWS``, random rows each step) and mapped by
  ``TeacherCache``. The gather is timed inside the step; the trainer does it on a thread while
  the previous step trains, so this is an upper bound of what a cached step costs;
- ``kd-live``: KD with the teacher (eval mode, no gradients) run on every step;
- ``cache-rows``: the gather alone (``TeacherCache.rows`` of 64 random rows), for scale.

kd-cached / ce is what distillation still costs with a cache (the KD loss, the rows); kd-live /
ce adds the teacher's forward pass. The cache's values are random: a step's time does not
depend on them.
"""

import numpy as np
import pytest
import timm
import torch

import fastkd  # noqa: F401  (registers the CIFAR nets in timm)
from fastkd.distillers import TeacherOutputs, build_distiller
from fastkd.engine import teacher_cache
from fastkd.engine.teacher_cache import SHARD_ROWS, TeacherCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, CLASSES, SIZE = 64, 100, 32
STUDENT = "resnet20"
TEACHERS = ("wrn_16_2", "resnet32x4")
CASES = ("ce", "kd-cached", "kd-live", "cache-rows")
CACHE_SHARDS = 2  # 8192 rows: a step's random rows come from both shards
WARMUP_ROUNDS, ROUNDS = 3, 15


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
def cache(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(CACHE_SHARDS * SHARD_ROWS, CLASSES, generator=generator)
    return write_cache(tmp_path_factory.mktemp("teacher-cache"), logits)


def batches_of_slots(rows, seed=0):
    """Endless batches of ``BATCH`` slots, shuffled epoch after epoch as a training run reads."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(rows)
        for first in range(0, rows - BATCH + 1, BATCH):
            yield order[first:first + BATCH]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("teacher_name", TEACHERS)
def bench_teacher_cache_step(benchmark, cache, teacher_name, case):
    benchmark.group = (f"training step, {STUDENT} <- {teacher_name}, batch {BATCH}, "
                       f"{SIZE}x{SIZE}, {CLASSES} classes, {DEVICE}")
    benchmark.extra_info["case"] = case
    slots = batches_of_slots(CACHE_SHARDS * SHARD_ROWS)

    def read_rows():
        outputs = cache.rows(0, next(slots))
        return TeacherOutputs(outputs.logits.to(DEVICE, non_blocking=True))

    if case == "cache-rows":
        benchmark.pedantic(read_rows, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        return

    torch.manual_seed(0)
    student = timm.create_model(STUDENT, num_classes=CLASSES)
    teacher = None
    if case == "kd-live":
        teacher = timm.create_model(teacher_name, num_classes=CLASSES).eval()
    distiller = build_distiller("ce" if case == "ce" else "kd", student, teacher).to(
        DEVICE).train()
    assert teacher is None or not teacher.training
    optimizer = torch.optim.SGD(distiller.get_trainable_module().parameters(), lr=0.01)
    images = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE)
    target = torch.randint(0, CLASSES, (BATCH,), device=DEVICE)

    def step():
        outputs = read_rows() if case == "kd-cached" else None
        loss = distiller(images, target, epoch=0.0, teacher_outputs=outputs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


def test_cached_step_matches_live(tmp_path):
    """The kd-cached case computes what kd-live does: with the teacher's own logits in a
    float32 cache, the loss and the student's gradients agree."""
    torch.manual_seed(0)
    teacher = timm.create_model("wrn_16_2", num_classes=CLASSES).eval()
    images = torch.randn(8, 3, SIZE, SIZE)
    target = torch.randint(0, CLASSES, (8,))
    with torch.no_grad():
        logits = teacher(images)
    cache = write_cache(tmp_path, logits, dtype="float32")
    results = []
    for given, outputs in ((teacher, None), (None, cache.rows(0, range(8)))):
        torch.manual_seed(1)
        student = timm.create_model(STUDENT, num_classes=CLASSES)
        loss = build_distiller("kd", student, given).train()(images, target, epoch=0.0,
                                                             teacher_outputs=outputs)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in student.parameters()]))
    (live_loss, live_grads), (cached_loss, cached_grads) = results
    torch.testing.assert_close(cached_loss, live_loss)
    for cached, live in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(cached, live)
