import importlib
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from trainer_helpers import FAST, job_result, run_jobs, run_main

from fastkd.data.demo import MANIFEST, build_demo_dataset

# The files whose tests start real processes (torchrun jobs, signals): the longest. pytest-xdist
# hands whole files to its workers in collection order (--dist loadfile), so these go first and
# the short files fill in beside them.
PROCESS_FILES = ("test_preemption.py", "test_trainer_faults.py", "test_trainer.py",
                 "test_teacher_cache.py", "test_gpu_check.py", "test_cli_imports.py")


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores for torch's threads: two
    workers that each spin two OpenMP threads on two cores take twice the CPU time."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in PROCESS_FILES)  # stable: order within


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
                       lambda folder: small_demo_tree(full_demo_dir, str(folder)))


def small_demo_tree(full_demo_dir, root):
    kept = []
    for split, count in SMALL_DEMO.items():
        for label in sorted(os.listdir(os.path.join(full_demo_dir, split))):
            names = sorted(os.listdir(os.path.join(full_demo_dir, split, label)))[:count]
            os.makedirs(os.path.join(root, split, label))
            for name in names:
                relative = f"{split}/{label}/{name}"
                shutil.copyfile(os.path.join(full_demo_dir, relative),
                                os.path.join(root, relative))
                kept.append(relative)
    with open(os.path.join(root, MANIFEST), "w") as handle:
        json.dump({"files": kept}, handle)
    return root


@pytest.fixture(scope="session")
def teacher_checkpoint(full_demo_dir, tmp_path_factory):
    """A resnet20 trained on the demo digits (CE, in this process), as a --teacher-checkpoint."""
    return shared_once(tmp_path_factory, "teacher",
                       lambda folder: train_teacher(full_demo_dir, str(folder)))


def train_teacher(full_demo_dir, output):
    # Two epochs of all the digits at batch 64: clearly better than chance, which a teacher must
    # be. (The two-process runs are the trainer tests' subject, not this fixture's.)
    result = run_main(["--dataset", "demo", "--data-dir", full_demo_dir, "--distiller", "ce",
                       "--output", output, "--experiment", "teacher", *FAST, "--epochs", "2",
                       "--lr", "0.05", "--warmup-epochs", "0"])
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
