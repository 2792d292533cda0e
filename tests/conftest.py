import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from trainer_helpers import FAST, job_result, run_jobs, run_main, small_demo_tree

from fastkd.data.demo import build_demo_dataset

# The order in which pytest-xdist hands whole files to its workers (--dist loadfile
# --no-loadscope-reorder), longest first (CPU seconds, measured) so that the short files fill in
# at the end. The first builds the session's shared runs (conftest's two_process_jobs: ~70 s);
# the next three need none of them, so the second worker is not left waiting for them. Files not
# named follow in collection order.
LONGEST_FIRST = ("test_preemption.py", "test_cli_imports.py", "test_gpu_check.py",
                 "test_host_reads.py", "test_trainer_faults.py", "test_teacher_cache.py",
                 "test_trainer.py", "test_ldrld.py", "test_hcd.py", "test_glyphs.py",
                 "test_plugins.py", "test_augment.py", "test_ops.py", "test_masked_classes.py")


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores for torch's threads: two
    workers that each spin two OpenMP threads on two cores take twice the CPU time."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


def shared_once(tmp_path_factory, name, build):
    """``build(folder)``, run once per test session however many xdist workers need it: the
    first builds it in ``folder`` (in the session's temporary root, which the workers share)
    while the others wait on a lock, then all read what it returned (JSON)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    record = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.exists():
            record.write_text(json.dumps(build(root / name)))
    return json.loads(record.read_text())


# Images per class and split kept in the trainer tests' demo tree: the trainer's cost is its
# training steps, and most tests need a few of them on real JPEGs, not 1,442.
SMALL_DEMO = {"train": 24, "val": 8}


@pytest.fixture(scope="session")
def full_demo_dir(tmp_path_factory):
    """The demo digits as JPEGs (1,442 train, 355 val), written once per test session."""
    return shared_once(tmp_path_factory, "digits", lambda folder: build_demo_dataset(str(folder)))


@pytest.fixture(scope="session")
def demo_dir(full_demo_dir, tmp_path_factory):
    """The demo tree with the first ``SMALL_DEMO`` images of each class and split (240 train,
    80 val). Its manifest lists just those, so the trainer's ``--dataset demo --data-dir`` takes
    it as complete rather than rebuilding it."""
    return shared_once(tmp_path_factory, "digits-small",
                       lambda folder: small_demo_tree(full_demo_dir, str(folder), SMALL_DEMO))


@pytest.fixture(scope="session")
def teacher_checkpoint(demo_dir, tmp_path_factory):
    """A ``trainer_helpers.MODEL`` net trained on the small demo tree (CE, in this process), as
    a --teacher-checkpoint."""
    return shared_once(tmp_path_factory, "teacher",
                       lambda folder: train_teacher(demo_dir, str(folder)))


def train_teacher(demo_dir, output):
    # Six epochs of 15 steps: ~94% top-1 on the tree's 80 validation images, far above the
    # trainer's bar for a teacher (chance, 10%, plus three standard errors: 20%). Fewer steps
    # leave batch norm's running statistics unsettled (chance-level evaluation).
    result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce",
                       "--output", output, "--experiment", "teacher", *FAST, "--epochs", "6",
                       "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(output, "teacher", "best.pth")


@pytest.fixture(scope="session")
def tree_with_bad_images(tmp_path_factory):
    """Four classes of 10 training and 4 validation JPEGs, plus files that do not decode: in train
    a truncated one, an empty one and one whose body is noise; in val a truncated one. The root
    and the bad files' paths."""
    from test_bad_images import BAD_FILES
    from test_data import write_tree

    def build(root):
        write_tree(root, ["a", "b", "c", "d"], 10, 4)
        bad = {"train/a/cut.jpg": "cut.jpg", "train/b/empty.jpg": "empty.jpg",
               "train/c/noise.jpg": "noise.jpg", "val/a/cut.jpg": "cut.jpg"}
        for name, kind in bad.items():
            (root / name).write_bytes(BAD_FILES[kind])
        return str(root), sorted(f"{root}/{name}" for name in bad)

    return shared_once(tmp_path_factory, "bad", build)


@pytest.fixture(scope="session")
def built_caches(demo_dir, teacher_checkpoint, tmp_path_factory):
    """test_teacher_cache's float32 caches of 2 views, built in this process: ``{name:
    folder}``."""
    from test_teacher_cache import build_caches

    return shared_once(tmp_path_factory, "caches",
                       lambda folder: build_caches(demo_dir, teacher_checkpoint, folder))


# The modules whose tests read uninterrupted two-process jobs: each has ``two_process_jobs(inputs)``
# giving its jobs, ``{name: argv}`` (see ``run_jobs``), beside the tests that read them.
JOB_MODULES = ("test_trainer", "test_trainer_faults", "test_teacher_cache", "test_preemption")


@pytest.fixture(scope="session")
def two_process_jobs(tmp_path_factory, demo_dir, teacher_checkpoint, built_caches,
                     tree_with_bad_images):
    """``two_process_jobs(name)``: a job of the modules' ``two_process_jobs``, all run in one
    torchrun launch of two processes (``run_jobs``), as ``(job_result, its --output folder)``.
    A torchrun launch costs ~9 s of CPU in imports; a dozen launches were a sixth of the
    suite."""
    def launch(folder):
        inputs = SimpleNamespace(demo_dir=demo_dir, teacher_checkpoint=teacher_checkpoint,
                                 caches=built_caches, bad_tree=tree_with_bad_images,
                                 output=lambda name: str(folder / name))
        jobs = {}
        for module in JOB_MODULES:
            jobs.update(importlib.import_module(module).two_process_jobs(inputs))
        run_jobs(folder, jobs, processes=2)
        return str(folder)

    folder = shared_once(tmp_path_factory, "two-process-jobs", launch)
    return lambda name: (job_result(folder, name, processes=2), os.path.join(folder, name))
