"""The CIFAR-style nets: parameter counts against the published ones, output shapes, timm
registration and the feature interface HCD relies on."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import timm
import torch

from fastkd.distillers import HCD
from fastkd.models.taps import stage_taps

# Parameters (millions, 100 classes) as published for the CIFAR-100 KD benchmark (CRD, Tian et
# al., ICLR 2020, and the papers that reuse it), to their two decimals.
PUBLISHED_MILLIONS = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.73,
    "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13_cifar": 9.46,
    "mobilenetv2_cifar": 0.81, "shufflenetv1_cifar": 0.95, "shufflenetv2_cifar": 1.36,
}
# (stem/stage channels) per feature_info entry, for 32x32 inputs.
FEATURE_SHAPES = {
    "resnet8x4": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "resnet8": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet20": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_40_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "vgg8": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
    "mobilenetv2_cifar": [(12, 16), (16, 8), (48, 4), (1280, 2)],
    "shufflenetv1_cifar": [(24, 32), (240, 16), (480, 8), (960, 4)],
    "shufflenetv2_cifar": [(24, 32), (116, 16), (232, 8), (1024, 4)],
    "vit_tiny_hybrid_cifar": [(192, 8)] * 4,  # its blocks' 8x8 tokens
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_count_and_logits(name):
    model = timm.create_model(name, num_classes=100)
    millions = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[name], abs=0.01)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet8_has_one_basic_block_a_stage():
    """RepDistiller's resnet8 (the tests' fast student): its parameters counted by hand from
    the architecture, 100 classes. Stem conv 3x3x3x16 and its batch norm: 464; stage 1, a block
    16 -> 16: 2 x (2,304 + 32) = 4,672; stage 2, 16 -> 32 at stride 2 with a 1x1 projection:
    4,608 + 9,216 + 2 x 64 + 512 + 64 = 14,528; stage 3, 32 -> 64 likewise: 18,432 + 36,864 +
    2 x 128 + 2,048 + 128 = 57,728; the classifier 64 x 100 + 100 = 6,500."""
    model = timm.create_model("resnet8", num_classes=100)
    assert sum(parameter.numel() for parameter in model.parameters()) == 83_892
    assert [len(stage) for stage in model.stages] == [1, 1, 1]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_feature_interface(name):
    model = timm.create_model(name, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(images)
    assert [(m.shape[1], m.shape[2]) for m in maps] == FEATURE_SHAPES[name]
    assert [(entry["num_chs"], 32 // entry["reduction"]) for entry in model.feature_info] == \
        FEATURE_SHAPES[name]
    embedding = model.forward_head(final, pre_logits=True)
    assert embedding.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(final), model(images))
    last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
    assert [m.shape for m in last_two] == [m.shape for m in maps[-2:]]


def test_stage_taps_and_hcd_with_cifar_students():
    resnet8x4 = timm.create_model("resnet8x4")
    assert [tap.feature_index for tap in stage_taps(resnet8x4, stages=(1, 2, 3))] == [1, 2, 3]
    assert [tap.feature_index for tap in stage_taps(timm.create_model("vgg8"))] == [0, 1, 2, 4]
    teacher = timm.create_model("resnet32x4", num_classes=100)
    student = timm.create_model("resnet8x4", num_classes=100)
    with pytest.raises(ValueError, match=r"subset of \(1, 2, 3\) for CifarNet, got \(1, 2, 3, 4\)"):
        HCD(student, teacher, stages=(1, 2, 3, 4))
    distiller = HCD(student, teacher, num_classes=100).train()  # all three stages
    assert [tap.stage for tap in distiller.get_trainable_module().taps] == [1, 2, 3]
    result = distiller(torch.randn(2, 3, 32, 32), torch.tensor([3, 99]))
    result["loss"].backward()
    assert result["output"].shape == (2, 100)
    trainable = distiller.get_trainable_module()
    assert all(parameter.grad is not None
               for modules in (trainable.projectors, trainable.mappers)
               for parameter in modules.parameters())


def test_hcd_from_the_hybrid_vit_into_a_cifar_resnet():
    """The evidence table's heterogeneous pair: the teacher's class-token embedding (192) beside
    the student's stages."""
    teacher = timm.create_model("vit_tiny_hybrid_cifar", num_classes=100)
    assert teacher.patch_embed.num_patches == 64
    distiller = HCD(timm.create_model("resnet20", num_classes=100), teacher,
                    num_classes=100).train()
    result = distiller(torch.randn(2, 3, 32, 32), torch.tensor([3, 99]))
    result["loss"].backward()
    assert result["output"].shape == (2, 100)
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_registration_errors():
    with pytest.raises(ValueError, match="resnet8x4 has no pretrained weights"):
        timm.create_model("resnet8x4", pretrained=True)
    with pytest.raises(ValueError, match=r"resnet8x4 takes no options \['drop_rate'\]"):
        timm.create_model("resnet8x4", drop_rate=0.1)
    assert "vgg13_cifar" in timm.list_models("vgg13*")


def test_the_trainer_tells_its_version():
    """``--version`` is the installed package's (``test_cli_imports`` covers ``import fastkd``
    registering the nets)."""
    repo = Path(__file__).resolve().parents[1]
    for entry in ([str(repo / "train" / "main.py")], ["-m", "fastkd.engine.cli"]):
        told = subprocess.run([sys.executable, *entry, "--version"], capture_output=True,
                              text=True, check=True)
        assert told.stdout.strip() == f"fastkd-train {version('fastkd')}", entry
