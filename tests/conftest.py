import json
import os
import shutil

import pytest
from trainer_helpers import FAST, run_main

from fastkd.data.demo import MANIFEST, build_demo_dataset

# Images per class and split kept in the trainer tests' demo tree: the trainer's cost is its
# training steps, and most tests need a few of them on real JPEGs, not 1,442.
SMALL_DEMO = {"train": 24, "val": 8}


@pytest.fixture(scope="session")
def full_demo_dir(tmp_path_factory):
    """The demo digits as JPEGs (1,442 train, 355 val), written once per test session."""
    return build_demo_dataset(str(tmp_path_factory.mktemp("digits")))


@pytest.fixture(scope="session")
def demo_dir(full_demo_dir):
    """The demo tree with the first ``SMALL_DEMO`` images of each class and split (240 train,
    80 val). Its manifest lists just those, so the trainer's ``--dataset demo --data-dir`` takes
    it as complete rather than rebuilding it."""
    root = os.path.join(os.path.dirname(full_demo_dir), "digits-small")
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
    output = str(tmp_path_factory.mktemp("teacher"))
    # Two epochs of all the digits at batch 64: clearly better than chance, which a teacher must
    # be. (The two-process runs are the trainer tests' subject, not this fixture's.)
    result = run_main(["--dataset", "demo", "--data-dir", full_demo_dir, "--distiller", "ce",
                       "--output", output, "--experiment", "teacher", *FAST, "--epochs", "2",
                       "--lr", "0.05", "--warmup-epochs", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(output, "teacher", "best.pth")
