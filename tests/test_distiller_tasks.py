"""The distillers as timm TrainingTasks, on real timm models: the teacher's own normalisation,
DDP around the trainable module only, EMA, compile, checkpoint state that timm's loader reads,
soft targets from timm's Mixup, and HCD's initialisation."""

import math

import pytest
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import unwrap_model
from torch import nn

from fastkd import ldrld_loss
from fastkd.distillers import build_distiller
from fastkd.distillers.base import normalisation

NUM_CLASSES = 10


def create(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def batch(size=4, seed=0, image_size=32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, image_size, image_size, generator=generator)
    return images, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_teacher_gets_its_own_normalisation():
    """A ViT teacher (mean = std = 0.5) of a ResNet student normalised with ImageNet's statistics
    sees the student's pixels renormalised: x_t = (x_s std_s + mean_s - 0.5) / 0.5."""
    student = create("resnet10t")
    teacher = create("vit_tiny_patch16_224", img_size=32)
    assert normalisation(teacher) == ((0.5,) * 3, (0.5,) * 3)
    task = build_distiller("kd", student, teacher)
    images, _ = batch()
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    pixels = images * std + mean
    with torch.no_grad():
        expected = teacher((pixels - 0.5) / 0.5)
    torch.testing.assert_close(task.teacher_logits(images), expected, rtol=1e-5, atol=1e-5)
    # The same normalisation on both sides: the input passes unchanged.
    same = build_distiller("kd", student, teacher, student_mean=(0.5,) * 3,
                           student_std=(0.5,) * 3)
    assert same.teacher_input(images) is images


def test_trainer_data_normalisation_overrides_the_students_config():
    """student_mean/std say what the data pipeline normalised with (here CIFAR-100's, as for a
    CIFAR net), and the ImageNet-normalised teacher is fed accordingly."""
    student, teacher = create("resnet20"), create("resnet10t")
    task = build_distiller("kd", student, teacher)  # resnet20's own cfg: CIFAR-100 statistics
    images, _ = batch()
    cifar_mean = torch.tensor((0.5071, 0.4865, 0.4409)).view(1, 3, 1, 1)
    cifar_std = torch.tensor((0.2673, 0.2564, 0.2762)).view(1, 3, 1, 1)
    imagenet_mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    imagenet_std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(task.teacher_input(images),
                               (images * cifar_std + cifar_mean - imagenet_mean) / imagenet_std)


def test_prepare_distributed_wraps_only_the_trainable_module(one_process_group):
    student, teacher = create("resnet20"), create("wrn_16_2")
    task = build_distiller("hcd", student, teacher, stages=(2, 3)).prepare_distributed()
    assert isinstance(task.get_trainable_module(), nn.parallel.DistributedDataParallel)
    assert not isinstance(task.teacher.model, nn.parallel.DistributedDataParallel)
    assert not any(parameter.requires_grad for parameter in task.teacher.parameters())
    assert task.student is student and task.get_eval_model() is student
    images, target = batch()
    task.train()(images, target)["loss"].backward()
    projector = task.get_trainable_module().module.projectors[0]
    assert all(parameter.grad is not None for parameter in projector.parameters())
    state = task.get_checkpoint_state()
    assert state["state_dict"].keys() == student.state_dict().keys()  # no "module." prefix
    assert set(state["task_state"]) == {"projectors", "mappers"}


@pytest.mark.parametrize("name", ["ldrld", "hcd"])
def test_ema_checkpoint_state_loads_with_timm(tmp_path, name):
    """After a step and an EMA update, the checkpoint state saved by torch loads into a fresh
    student with timm.models.load_checkpoint: the EMA weights by default, the student's with
    use_ema=False; HCD's projectors and mappers come back through load_checkpoint_state."""
    student, teacher = create("resnet20"), create("wrn_16_2")
    options = dict(stages=(1, 2, 3)) if name == "hcd" else {}
    task = build_distiller(name, student, teacher, **options).train()
    task.setup_ema(decay=0.5)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    images, target = batch()
    task(images, target)["loss"].backward()
    optimizer.step()
    task.update_ema(step=10)  # timm: updates at step <= 1 copy the weights
    path = tmp_path / "best.pth"
    torch.save({**task.get_checkpoint_state(), **task.get_checkpoint_state(ema=True)}, path)

    ema_weights = unwrap_model(task.get_eval_model(ema=True))
    for use_ema, expected in ((True, ema_weights), (False, student)):
        fresh = create("resnet20", seed=1)
        timm.models.load_checkpoint(fresh, str(path), use_ema=use_ema, weights_only=True)
        for key, value in expected.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
    assert not torch.equal(next(ema_weights.parameters()), next(student.parameters()))

    restored = build_distiller(name, create("resnet20", seed=2), create("wrn_16_2"), **options)
    saved = torch.load(path, weights_only=True)
    restored.load_checkpoint_state(saved["state_dict"], saved.get("task_state"))
    with torch.no_grad():
        torch.testing.assert_close(restored.train()(images, target)["loss"],
                                   task(images, target)["loss"])


def test_compile_keeps_the_result():
    student, teacher = create("resnet20"), create("wrn_16_2")
    task = build_distiller("ldrld", student, teacher).train()
    images, target = batch()
    with torch.no_grad():
        eager = task(images, target)
        task.compile(backend="eager")
        compiled = task(images, target)
    assert task.student is student
    torch.testing.assert_close(compiled["loss"], eager["loss"])


def soft_batch(seed=3):
    images, target = batch(size=4, seed=seed)
    torch.manual_seed(seed)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1,
                  num_classes=NUM_CLASSES)
    return mixup(images, target)


def test_soft_targets_from_mixup():
    """CE-based terms take timm's soft targets (SoftTargetCrossEntropy); LDRLD's relational terms
    take no label at all."""
    images, soft = soft_batch()
    assert soft.shape == (4, NUM_CLASSES)
    student, teacher = create("resnet20"), create("wrn_16_2")
    for name in ("ce", "kd", "ldrld"):
        result = build_distiller(name, student, teacher).train()(images, soft)
        torch.testing.assert_close(result["ce"],
                                   SoftTargetCrossEntropy()(result["output"].float(), soft))
        assert torch.isfinite(result["loss"])
    ldrld = build_distiller("ldrld", student, teacher, top_d=5).train()
    result = ldrld(images, soft)
    with torch.no_grad():
        relational = ldrld_loss(result["output"], ldrld.teacher_logits(images),
                                soft.argmax(dim=1), top_d=5, ce_weight=0.0)
    torch.testing.assert_close(result["loss"] - result["ce"], relational)


@pytest.mark.parametrize("name", ["dkd", "hcd"])
def test_methods_that_index_the_true_class_refuse_soft_targets(name):
    images, soft = soft_batch()
    options = dict(stages=(3,)) if name == "hcd" else {}
    task = build_distiller(name, create("resnet20"), create("wrn_16_2"), **options).train()
    with pytest.raises(ValueError, match="needs class indices .* without mixup/cutmix"):
        task(images, soft)


def test_hcd_modules_start_as_in_ofa_kd():
    """Linear: trunc_normal_(std=0.02), zero bias; conv: kaiming_normal_(mode='fan_out'), i.e.
    std sqrt(2 / fan_out) with fan_out = out_channels * kh * kw; BatchNorm: 1 and 0."""
    torch.manual_seed(0)
    task = build_distiller("hcd", create("resnet18"), create("vit_tiny_patch16_224", img_size=32))
    trainable = task.get_trainable_module()
    linears = [m for m in trainable.mappers.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in trainable.projectors.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in trainable.projectors.modules() if isinstance(m, nn.BatchNorm2d)]
    assert linears and convs and norms
    for linear in linears:
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert linear.weight.abs().max().item() <= 2.0  # timm's trunc_normal_ bounds
        assert not linear.bias.any()
    for conv in convs:
        out_channels, _, height, width = conv.weight.shape
        expected = math.sqrt(2.0 / (out_channels * height * width))
        if conv.weight.numel() >= 4096:  # enough samples for a 10% estimate of the std
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert conv.bias is None or not conv.bias.any()
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert not norm.bias.any()


def test_a_plain_timm_style_loop():
    """README's loop: the task's dict drives an optimiser over the trainable module."""
    student, teacher = create("resnet20"), create("wrn_16_2")
    task = build_distiller("ldrld", student, teacher, label_smoothing=0.1)
    optimizer = create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.05)
    images, target = batch(size=8)
    before = {name: value.clone() for name, value in student.state_dict().items()}
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    for _ in range(2):
        task.train()
        result = task(images, target)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
    assert all(not torch.equal(before[name], value) for name, value in student.named_parameters())
    assert all(torch.equal(teacher_before[name], value)
               for name, value in teacher.state_dict().items())
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.get_eval_model()(images), student(images))
