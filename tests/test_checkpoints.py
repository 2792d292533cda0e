"""Checkpoints: fastkd's own read with torch.load(weights_only=True) and timm; teacher weights
load from the files other tools write; mismatched or unreadable files are refused in a line."""

import argparse
import random

import numpy as np
import pytest
import safetensors.torch
import timm
import timm.utils
import torch
import torch.distributed as dist

from fastkd.engine import checkpoint

DATA_CONFIG = {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762],
               "input_size": [3, 32, 32], "crop_pct": 1.0}


def create(name="resnet20", num_classes=10, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes)


def perturbed(model):
    """``model`` with every parameter changed in place, so that its EMA copy differs from it."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model


def assert_same_weights(model, expected_state_dict):
    state_dict = model.state_dict()
    assert state_dict.keys() == expected_state_dict.keys()
    for key, value in expected_state_dict.items():
        assert torch.equal(state_dict[key], value), key


def fastkd_checkpoint(student, ema_student=None):
    """A checkpoint in the trainer's format, after one optimiser step."""
    projector = torch.nn.Linear(64, 8)  # an extra module of a distiller, e.g. a feature projector
    optimizer = torch.optim.SGD([*student.parameters(), *projector.parameters()], lr=0.1,
                                momentum=0.9)
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    state = {"arch": "resnet20", "state_dict": student.state_dict(),
             "task_state": {"projector": projector.state_dict()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
             "epoch": 3, "best_top1": 41.5,
             "args": {"model": "resnet20", "lr": 0.1, "hcd_stages": [1, 2], "teacher": None},
             "data_config": DATA_CONFIG,
             "summary": [{"epoch": 0.0, "loss": 2.1, "top1": 30.0}],
             "bad_images": {"/data/train/x.jpg": "truncated"},
             "rng": [checkpoint.rng_state()]}
    if ema_student is not None:
        state["state_dict_ema"] = ema_student.state_dict()
    return state


# -- teacher weights from the usual files ---------------------------------------------------------
def test_loads_a_plain_state_dict(tmp_path):
    teacher, path = create(seed=1), tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    fresh = create(seed=2)
    checkpoint.load_weights(fresh, path)
    assert_same_weights(fresh, teacher.state_dict())
    assert checkpoint.data_config_of(path) is None


def test_loads_a_timm_model_from_safetensors(tmp_path):
    teacher, path = create("resnet10t", seed=1), tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(teacher.state_dict(), path)
    fresh = create("resnet10t", seed=2)
    checkpoint.load_weights(fresh, path)
    assert_same_weights(fresh, teacher.state_dict())
    assert checkpoint.data_config_of(path) is None


def test_loads_a_ddp_state_dict(tmp_path):
    teacher, path = create(seed=1), tmp_path / "teacher.pth"
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        state_dict = torch.nn.parallel.DistributedDataParallel(teacher).state_dict()
    finally:
        dist.destroy_process_group()
    assert all(key.startswith("module.") for key in state_dict)
    torch.save(state_dict, path)
    fresh = create(seed=2)
    checkpoint.load_weights(fresh, path)
    assert_same_weights(fresh, teacher.state_dict())


def test_loads_a_timm_training_checkpoint_ema_first(tmp_path):
    teacher = create(seed=1)
    ema = timm.utils.ModelEmaV3(teacher)
    perturbed(teacher)
    saver = timm.utils.CheckpointSaver(
        teacher, torch.optim.SGD(teacher.parameters(), lr=0.1),
        args=argparse.Namespace(model="resnet20"), model_ema=ema, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0)
    path = tmp_path / "last.pth.tar"

    fresh = create(seed=2)
    checkpoint.load_weights(fresh, path)
    assert_same_weights(fresh, ema.module.state_dict())
    checkpoint.load_weights(fresh, path, use_ema=False)
    assert_same_weights(fresh, teacher.state_dict())
    assert checkpoint.data_config_of(path) is None  # its args, a Namespace, are read too


@pytest.mark.parametrize("with_ema", [True, False])
def test_fastkd_checkpoint_reads_with_weights_only_and_timm(tmp_path, with_ema):
    student = create(seed=1)
    ema = timm.utils.ModelEmaV3(student) if with_ema else None
    state = fastkd_checkpoint(perturbed(student), ema and ema.module)
    path = tmp_path / "best.pth"
    checkpoint.save_atomic(state, path)
    expected = (ema.module if with_ema else student).state_dict()

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["args"] == state["args"] and loaded["summary"] == state["summary"]
    assert checkpoint.data_config_of(path) == DATA_CONFIG

    by_timm = create(seed=2)
    timm.models.load_checkpoint(by_timm, str(path))
    assert_same_weights(by_timm, expected)

    by_fastkd = create(seed=3)
    checkpoint.load_weights(by_fastkd, path)
    assert_same_weights(by_fastkd, expected)
    checkpoint.load_weights(by_fastkd, path, use_ema=False)
    assert_same_weights(by_fastkd, student.state_dict())


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, num_classes", [("resnet20", 100), ("wrn_16_2", 10)])
def test_a_checkpoint_of_another_model_is_refused_in_a_short_message(tmp_path, name,
                                                                     num_classes):
    path = tmp_path / f"{name}.pth"
    torch.save(create(name, num_classes).state_dict(), path)
    model = create()
    with pytest.raises(SystemExit) as refusal:
        checkpoint.load_weights(model, path, flag="--init-checkpoint", arch="resnet20")
    message = str(refusal.value)
    assert f"--init-checkpoint {path}" in message
    assert "resnet20 with 10 classes?" in message
    assert len(message) < 800
    file_keys, model_keys = torch.load(path).keys(), model.state_dict().keys()
    for kind in (model_keys - file_keys, file_keys - model_keys):
        assert sum(f"{key} [" in message for key in kind) <= 5
    if num_classes == 100:
        assert "2 keys with another shape: fc.weight [100, 64] (model: [10, 64])" in message


def test_a_timm_model_names_itself_in_the_hint(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(create("resnet10t", num_classes=100).state_dict(), path)
    with pytest.raises(SystemExit, match="is it a checkpoint of resnet10t with 10 classes"):
        checkpoint.load_weights(create("resnet10t"), path)


class NotATensor:
    """Any Python object pickled into a file: weights_only reading refuses it."""


@pytest.mark.parametrize("stowaway, named", [(NotATensor(), "NotATensor"),
                                             (np.random.get_state(), "numpy")])
def test_a_pickled_object_makes_the_file_unreadable(tmp_path, stowaway, named):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": create().state_dict(), "rng": stowaway}, path)
    with pytest.raises(SystemExit, match=f"cannot read the checkpoint {path} .*{named}"):
        checkpoint.load(path)
    with pytest.raises(SystemExit, match=f"cannot read the checkpoint {path} given to "
                                         f"--teacher-checkpoint .*{named}") as refusal:
        checkpoint.load_weights(create(), path)
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("damage", ["missing", "not torch's", "empty", "truncated"])
def test_a_missing_or_damaged_file_is_unreadable(tmp_path, damage):
    path = tmp_path / "teacher.pth"
    if damage == "not torch's":
        path.write_text("not a checkpoint")
    elif damage == "empty":
        path.touch()
    elif damage == "truncated":
        torch.save(create().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    for read in (checkpoint.load, lambda path: checkpoint.load_weights(create(), path)):
        with pytest.raises(SystemExit, match=f"cannot read the checkpoint {path}") as refusal:
            read(path)
        assert "weights_only" not in str(refusal.value)


# -- random generators ----------------------------------------------------------------------------
def draws():
    """Numbers from every generator a run uses, Gaussians included (numpy and python cache
    one of each pair they draw)."""
    numbers = [torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
               [random.random(), random.gauss(0, 1)]]
    if torch.cuda.is_available():
        numbers.append(torch.rand(3, device="cuda").tolist())
    return numbers


def test_rng_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    np.random.randn(1), random.gauss(0, 1)  # leave a cached Gaussian in both
    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"rng": [checkpoint.rng_state()]}, path)
    after_saving = draws()

    torch.manual_seed(6), np.random.seed(6), random.seed(6)
    checkpoint.set_rng_state(torch.load(path, weights_only=True)["rng"][0])
    assert draws() == after_saving
