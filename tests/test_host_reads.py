"""A training step reads nothing back from the device, and ``--dataset synthetic``.

On a GPU every read of a tensor's value on the host (``item``, ``tolist``, ``float()``,
``bool()``, ...) waits for all the work queued before it. These tests run the real trainer on the
CPU and count such reads while it trains: they may happen at log points and at an epoch's end,
never in proportion to the steps between them.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import MODEL

from fastkd import ops, validation
from fastkd.data.loaders import create_loaders
from fastkd.engine import checkpoint
from fastkd.engine.cli import main
from fastkd.engine.run import Run
from fastkd.methods import methods

# The aten ops that hand a value to the host (item/float/int/bool/if go through the first; below
# autograd, inside a fastkd op, item is dispatched whole), and those whose output shape depends
# on values: on CUDA each is a device sync.
SYNCING_OPS = ("aten._local_scalar_dense", "aten.item", "aten.equal", "aten.nonzero",
               "aten.masked_select", "aten._unique2", "aten.unique_consecutive")


def on_device(values, kind):
    flat = values if isinstance(values, (list, tuple)) else [values]
    return any(isinstance(value, torch.Tensor) and value.device.type == kind for value in flat)


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values made while active: syncing aten ops, and
    ``Tensor.tolist``/``Tensor.numpy``, which bypass the dispatcher. A fused loss
    (``torch.ops.fastkd``) is counted inside: its implementation runs with this mode active."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastkd":
            TorchDispatchMode.__enter__(self)  # the mode is off inside its own dispatch
            try:
                return ops.implementation(func)(*args, **(kwargs or {}))
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        output = func(*args, **(kwargs or {}))
        if str(func.overloadpacket) in SYNCING_OPS or (
                on_device(args, "cuda") and on_device(output, "cpu")):  # a copy to the host
            self.reads += 1
        return output

    def __enter__(self):
        self.patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, self._counting(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.reads += 1
            return method(tensor, *args, **kwargs)
        return counted


def test_the_counter_sees_each_kind_of_read():
    value = torch.tensor([1.5, -2.0])
    reads = [lambda: value[0].item(), lambda: value.tolist(), lambda: float(value[0]),
             lambda: bool(value[0] > 0), lambda: int(value[1]), lambda: value.numpy(),
             lambda: torch.equal(value, value), lambda: value.nonzero()]
    for read in reads:
        with HostReads() as counter:
            read()
        assert counter.reads == 1
    with HostReads() as counter:
        (value * 2 + 1).sum().exp()  # device work only
    assert counter.reads == 0


def test_the_counter_sees_reads_inside_a_fused_loss(monkeypatch):
    """A read inside a loss op's implementation is counted."""
    from fastkd import dkd_loss
    from fastkd.vectorized import dkd

    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    target = torch.tensor([0, 3, 9, 2])
    monkeypatch.setattr(validation, "reads_values", lambda tensor: False)  # as on CUDA
    with HostReads() as counter:
        dkd_loss(student, teacher, target, backend="torch").backward()
    assert counter.reads == 0
    binary_kl = dkd.binary_kl_of_gaps

    def reading_binary_kl(teacher_gap, student_gap):
        teacher_gap.sum().item()
        return binary_kl(teacher_gap, student_gap)

    monkeypatch.setattr(dkd, "binary_kl_of_gaps", reading_binary_kl)
    with HostReads() as counter:
        dkd_loss(student, teacher, target, backend="torch").backward()
    assert counter.reads == 1


TRAIN_EPOCH = Run.train_epoch  # unpatched


def synthetic_run(tmp_path, monkeypatch, distiller, samples, log_interval, extra=()):
    """Train two epochs of ``samples`` synthetic 32x32 images in batches of 8; returns the host
    reads counted in each epoch's ``train_epoch``."""
    counts = []
    # The losses check the labels' range on the host for CPU tensors only (a CPU read is free);
    # on CUDA they skip it. Here the CPU stands for CUDA.
    monkeypatch.setattr(validation, "reads_values", lambda tensor: False)

    def counted(self, epoch, start_step, meter):
        with HostReads() as counter:
            result = TRAIN_EPOCH(self, epoch, start_step, meter)
        counts.append(counter.reads)
        return result

    monkeypatch.setattr(Run, "train_epoch", counted)
    teacher = [] if distiller == "ce" else ["--teacher", MODEL, "--allow-untrained-teacher"]
    with pytest.raises(SystemExit) as stop:
        main(["--dataset", "synthetic", "--num-classes", "10", "--img-size", "32",
              "--model", MODEL, "--distiller", distiller, *teacher,
              "--synthetic-samples", str(samples), "-b", "8", "--epochs", "2", "--lr", "0.01",
              "--log-interval", str(log_interval), "--output", str(tmp_path), *extra])
    assert stop.value.code == 0
    return counts


@pytest.mark.parametrize("distiller", list(methods()))
def test_reads_do_not_grow_with_the_steps_between_log_points(tmp_path, monkeypatch, distiller):
    # 2 steps per log point, then 4: the same reads per epoch (one log point each).
    two = synthetic_run(tmp_path / "a", monkeypatch, distiller, samples=16, log_interval=2)
    four = synthetic_run(tmp_path / "b", monkeypatch, distiller, samples=32, log_interval=4)
    assert two == four
    # Two log points in an epoch of 2 steps read more than one in 4 steps: the counter sees the
    # trainer's reads.
    two_points = synthetic_run(tmp_path / "c", monkeypatch, distiller, samples=16,
                               log_interval=1)
    assert all(more > one for more, one in zip(two_points, four))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("distiller, precision", [("ldrld", "bfloat16"), ("hcd", "bfloat16"),
                                                  ("dkd", "bfloat16"), ("ldrld", "float16")])
def test_a_cuda_step_reads_nothing(tmp_path, monkeypatch, distiller, precision):
    """The Triton kernels, autocast and (fp16) the GradScaler with a fused optimiser."""
    extra = ["--amp", "--amp-dtype", precision, "--channels-last"]
    two = synthetic_run(tmp_path / "a", monkeypatch, distiller, 16, 2, extra)
    four = synthetic_run(tmp_path / "b", monkeypatch, distiller, 32, 4, extra)
    assert two == four


def test_mixup_and_ema_steps_read_nothing_either(tmp_path, monkeypatch):
    extra = ["--mixup", "0.8", "--cutmix", "1.0", "--model-ema", "--clip-grad", "1.0"]
    two = synthetic_run(tmp_path / "a", monkeypatch, "ldrld", 16, 2, extra)
    four = synthetic_run(tmp_path / "b", monkeypatch, "ldrld", 32, 4, extra)
    assert two == four


def test_a_non_finite_loss_stops_within_a_log_interval_keeping_the_good_checkpoint(
        tmp_path, capsys):
    # Epoch 0 warms up at 1e-6 and saves; epoch 1's rate of 1e30 blows the weights up.
    with pytest.raises(SystemExit) as stop:
        main(["--dataset", "synthetic", "--num-classes", "10", "--img-size", "32",
              "--model", MODEL, "--distiller", "ce", "--synthetic-samples", "96", "-b", "8",
              "--epochs", "2", "--lr", "1e30", "--warmup-epochs", "1", "--warmup-lr", "1e-6",
              "--log-interval", "5", "--output", str(tmp_path), "--experiment", "run"])
    message = str(stop.value.code)
    assert message.startswith("error: non-finite loss at epoch 1 step ")
    bad_step = int(message.split(" step ")[1].split()[0])
    seen_at = int(message.split("seen at step ")[1].split(")")[0])
    assert bad_step <= seen_at < bad_step + 5
    last = tmp_path / "run" / "last.pth"
    assert f"the last good checkpoint is {last} (resumes at epoch 1)" in message
    state = checkpoint.load(str(last))
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["state_dict"].values()
               if value.is_floating_point())


def test_synthetic_loaders_shard_the_epoch_and_repeat_one_batch():
    loaders = [create_loaders("synthetic", batch_size=4, image_size=16, num_classes=7,
                              synthetic_samples=21, rank=rank, world_size=2, channels_last=True)
               for rank in (0, 1)]
    (train0, val0), (train1, _) = loaders
    batches = [list(train0), list(train1)]
    # 21 samples, 2 ranks, batches of 4: 2 full global batches of 8 an epoch.
    assert [[len(labels) for _, labels in rank] for rank in batches] == [[4, 4], [4, 4]]
    assert len(train0) == 2 and train0.dataset_size == 21 and train0.num_classes == 7
    images, labels = batches[0][0]
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert 0 <= labels.min() and labels.max() < 7
    assert torch.equal(batches[0][1][0], images)  # made once, read again
    assert not torch.equal(batches[1][0][0], images)  # each rank its own
    assert val0.dataset_size == 8 and len(val0) == 1


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "."], "--dataset synthetic makes random tensors on the device: --data-dir"),
    (["--loader", "torch"], "--loader would change nothing"),
    (["--aa", "v0", "--reprob", "0.5"], "--aa, --reprob would change nothing"),
    (["--synthetic-samples", "0"], "--synthetic-samples must be a positive number, got 0"),
    (["--num-classes", "0"], "--num-classes must be 2 or more for --dataset synthetic, got 0"),
    (["--scale", "0", "1"], "--scale must be two area fractions 0 < low <= high <= 1"),
])
def test_synthetic_refusals(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--dataset", "synthetic", "--model", MODEL, "--distiller", "ce",
              "--output", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_synthetic_samples_belong_to_synthetic_data(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--dataset", "demo", "--synthetic-samples", "100", "--output", str(tmp_path)])
    assert "--synthetic-samples is for --dataset synthetic, not demo" in capsys.readouterr().err
