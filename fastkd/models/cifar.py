"""The CIFAR-style networks of the KD literature (32x32 inputs), and a small hybrid ViT for 32 px,
registered in timm's registry.

``timm.create_model("resnet8x4", num_classes=100)`` works once ``fastkd.models`` is imported.
Architectures follow the common KD benchmark definitions (CRD, mdistiller): CIFAR ResNets with
three stages of basic blocks, pre-activation wide ResNets, and VGG with batch norm. Each model
has timm's interface (``forward_features``, ``forward_head(pre_logits=)``,
``forward_intermediates``, ``feature_info``, ``num_features``), so every distiller, HCD's stage
taps included, works with them. Names timm already uses for ImageNet networks get a ``_cifar``
suffix: ``vgg13_cifar``, ``mobilenetv2_cifar``, ``shufflenetv1_cifar``, ``shufflenetv2_cifar``.
"""

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..data.common import CIFAR100_MEAN, CIFAR100_STD, DEFAULT_CROP_RATIO


def conv3x3(in_channels, out_channels, stride=1, bias=False):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Wide-ResNet block: BN-ReLU-conv-BN-ReLU-conv + shortcut (1x1 conv of the activated input
    when the width changes)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), conv3x3(out_channels, out_channels))
        self.projection = None
        if in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        activated = self.pre(x)
        shortcut = x if self.projection is None else self.projection(activated)
        return self.body(activated) + shortcut


def channel_shuffle(x, groups):
    batch, channels, height, width = x.shape
    return (x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
            .reshape(batch, channels, height, width))


def conv_bn(in_channels, out_channels, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                        groups=groups, bias=False), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (always, t = 1 included), 3x3 depthwise, 1x1 project;
    residual when the shape is kept."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class ShuffleUnitV1(nn.Module):
    """ShuffleNet unit: grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1; the shortcut
    is added, or (stride 2) average-pooled and concatenated."""

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        middle = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.reduce = conv_bn(in_channels, middle, 1, groups=self.first_groups)
        self.depthwise = conv_bn(middle, middle, 3, stride, groups=middle)
        self.expand = conv_bn(middle, out_channels, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.first_groups)))
        if self.shortcut is None:
            return self.relu(out + x)
        return self.relu(torch.cat([out, self.shortcut(x)], 1))


class ShuffleUnitV2(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits the channels and transforms one half; stride 2
    transforms two copies (depthwise-pointwise and pointwise-depthwise-pointwise); concatenate
    and shuffle."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        source = in_channels if stride == 2 else half
        self.right = nn.Sequential(conv_bn(source, half, 1),
                                   conv_bn(half, half, 3, stride, groups=half, relu=False),
                                   conv_bn(half, half, 1))
        if stride == 2:
            self.left = nn.Sequential(
                conv_bn(in_channels, in_channels, 3, 2, groups=in_channels, relu=False),
                conv_bn(in_channels, half, 1))

    def forward(self, x):
        if self.stride == 2:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            kept, changed = x.chunk(2, dim=1)
            out = torch.cat([kept, self.right(changed)], 1)
        return channel_shuffle(out, 2)


def block_stage(block, in_channels, out_channels, count, stride):
    blocks = [block(in_channels, out_channels, stride)]
    blocks += [block(out_channels, out_channels, 1) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class CifarNet(nn.Module):
    """A stem, a list of stages and a global-average-pool + linear head, with timm's feature
    interface. ``feature_info`` lists the stem (when it is a tap) and every stage."""

    def __init__(self, stem, stages, stage_channels, stage_reductions, num_classes, stem_tap=None):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = stage_channels[-1]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(self.num_features, num_classes)
        taps = [] if stem_tap is None else [dict(num_chs=stem_tap, reduction=1, module="stem")]
        self.feature_info = taps + [
            dict(num_chs=channels, reduction=reduction, module=f"stages.{index}")
            for index, (channels, reduction) in enumerate(zip(stage_channels, stage_reductions))]
        self.stem_is_tap = stem_tap is not None

    def forward_features(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x, pre_logits=False):
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False):
        """timm's contract: the outputs of the feature_info entries in ``indices`` (all by
        default; an int n means the last n), and the final features unless
        ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for {type(self).__name__}")
        count = len(self.feature_info)
        if indices is None:
            indices = range(count)
        elif isinstance(indices, int):
            indices = range(count - indices, count)
        wanted = {index % count for index in indices}
        intermediates = []
        x = self.stem(x)
        if self.stem_is_tap and 0 in wanted:
            intermediates.append(x)
        for position, stage in enumerate(self.stages, start=int(self.stem_is_tap)):
            x = stage(x)
            if position in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


def cifar_resnet(depth, widths, num_classes):
    """ResNet-depth for CIFAR: stem conv(3 -> widths[0]); three stages of (depth - 2) / 6 basic
    blocks at widths[1..3], strides 1, 2, 2."""
    blocks = (depth - 2) // 6
    stem = nn.Sequential(conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    stages = [block_stage(BasicBlock, widths[0], widths[1], blocks, 1),
              block_stage(BasicBlock, widths[1], widths[2], blocks, 2),
              block_stage(BasicBlock, widths[2], widths[3], blocks, 2)]
    return CifarNet(stem, stages, widths[1:], (1, 2, 4), num_classes, stem_tap=widths[0])


def wide_resnet(depth, widen, num_classes):
    """WRN-depth-widen: stem conv(3 -> 16); three stages of (depth - 4) / 6 pre-activation blocks
    at 16k, 32k, 64k; the final BN-ReLU closes the last stage."""
    blocks, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
    stages = [block_stage(PreActBlock, 16, widths[0], blocks, 1),
              block_stage(PreActBlock, widths[0], widths[1], blocks, 2),
              nn.Sequential(block_stage(PreActBlock, widths[1], widths[2], blocks, 2),
                            nn.BatchNorm2d(widths[2]), nn.ReLU(inplace=True))]
    return CifarNet(conv3x3(3, 16), stages, widths, (1, 2, 4), num_classes, stem_tap=16)


def vgg(layout, num_classes):
    """VGG with batch norm: five blocks of 3x3 conv-BN-ReLU, 2x2 max-pooling before blocks 1-3
    (none before block 4 at 32x32 input), global average pooling, one linear layer."""
    stages, in_channels = [], 3
    for index, widths in enumerate(layout):
        layers = [nn.MaxPool2d(2)] if index in (1, 2, 3) else []
        for width in widths:
            layers += [conv3x3(in_channels, width, bias=True), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            in_channels = width
        stages.append(nn.Sequential(*layers))
    channels = [widths[-1] for widths in layout]
    return CifarNet(nn.Identity(), stages, channels, (1, 2, 4, 8, 8), num_classes)


def mobilenet_v2_half(num_classes):
    """MobileNetV2 at width 0.5 with expansion 6 (the KD benchmark's "MobileNetV2"): stride-2 stem,
    inverted residual stages grouped by resolution, 1x1 conv to 1280 closing the last stage."""
    layout = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]
    blocks, in_channels = [], 16
    for expansion, width, count, stride in layout:
        for index in range(count):
            blocks.append(InvertedResidual(in_channels, width // 2, stride if index == 0 else 1,
                                           expansion))
            in_channels = width // 2
    stages = [nn.Sequential(*blocks[:3]), nn.Sequential(*blocks[3:6]),
              nn.Sequential(*blocks[6:13]), nn.Sequential(*blocks[13:], conv_bn(160, 1280, 1))]
    return CifarNet(conv_bn(3, 16, 3, 2), stages, (12, 16, 48, 1280), (2, 4, 8, 16),
                    num_classes)


def shufflenet_v1(num_classes, widths=(240, 480, 960), counts=(4, 8, 4), groups=3):
    """ShuffleNet (g = 3): 1x1 stem to 24, three stages whose first unit halves the resolution
    and concatenates its pooled input."""
    stages, in_channels = [], 24
    for width, count in zip(widths, counts):
        units = [ShuffleUnitV1(in_channels, width - in_channels, 2, groups)]
        units += [ShuffleUnitV1(width, width, 1, groups) for _ in range(count - 1)]
        stages.append(nn.Sequential(*units))
        in_channels = width
    return CifarNet(conv_bn(3, 24, 1), stages, widths, (2, 4, 8), num_classes, stem_tap=24)


def shufflenet_v2(num_classes, widths=(116, 232, 464), counts=(3, 7, 3), last=1024):
    """ShuffleNetV2 1x: 3x3 stem to 24, three stages of one stride-2 unit and ``counts`` stride-1
    units, a 1x1 conv to 1024 closing the last stage."""
    stages, in_channels = [], 24
    for index, (width, count) in enumerate(zip(widths, counts)):
        units = [ShuffleUnitV2(in_channels, width, 2)]
        units += [ShuffleUnitV2(width, width, 1) for _ in range(count)]
        if index == len(widths) - 1:
            units.append(conv_bn(width, last, 1))
        stages.append(nn.Sequential(*units))
        in_channels = width
    return CifarNet(conv_bn(3, 24, 3), stages, (*widths[:-1], last), (2, 4, 8), num_classes,
                    stem_tap=24)


class ConvStemEmbed(PatchEmbed):
    """A ViT's patch embedding with a convolutional stem, for 32 px: conv3x3-BN-ReLU layers of
    widths 32, 64, 64, 128, 128 (the second and fourth of stride 2), then a 1x1 convolution to
    the embedding width, so that each of the 8x8 tokens sees a 4x4 patch through a CNN's early
    layers rather than one linear map of its pixels. timm's PatchEmbed otherwise (grid,
    flatten, norm).

    Why: a plain ViT (patch 4, 6 blocks) stayed at chance for 6 epochs of the glyphs where
    wrn_16_2 reached 65% in 5; one with ViT_C's stride-2-only stem (Xiao et al., "Early
    convolutions help transformers see better", 2021) was at 5.8% after 6 (README, "HCD from a
    ViT teacher")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # patch_size 4: two stride-2 layers below
        layers, width = [], self.proj.in_channels
        for out_width, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
            layers.append(conv_bn(width, out_width, 3, stride))
            width = out_width
        self.proj = nn.Sequential(*layers, nn.Conv2d(width, self.proj.out_channels, 1))


def vit_tiny_hybrid(num_classes, depth=4):
    """ViT-Tiny's blocks (width 192, 3 heads, pre-norm, class token) on the 64 tokens of
    ``ConvStemEmbed`` at 32 px: the heterogeneous teacher of the evidence table's hcd-vit."""
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=depth, num_heads=3,
                             num_classes=num_classes, embed_layer=ConvStemEmbed)


CIFAR_MODELS = {
    "resnet8x4": lambda classes: cifar_resnet(8, (32, 64, 128, 256), classes),
    "resnet32x4": lambda classes: cifar_resnet(32, (32, 64, 128, 256), classes),
    "resnet8": lambda classes: cifar_resnet(8, (16, 16, 32, 64), classes),
    "resnet20": lambda classes: cifar_resnet(20, (16, 16, 32, 64), classes),
    "resnet56": lambda classes: cifar_resnet(56, (16, 16, 32, 64), classes),
    "resnet110": lambda classes: cifar_resnet(110, (16, 16, 32, 64), classes),
    "wrn_16_2": lambda classes: wide_resnet(16, 2, classes),
    "wrn_40_2": lambda classes: wide_resnet(40, 2, classes),
    "vgg8": lambda classes: vgg(((64,), (128,), (256,), (512,), (512,)), classes),
    "vgg13_cifar": lambda classes: vgg(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
                                       classes),
    "mobilenetv2_cifar": mobilenet_v2_half,
    "shufflenetv1_cifar": shufflenet_v1,
    "shufflenetv2_cifar": shufflenet_v2,
    "vit_tiny_hybrid_cifar": vit_tiny_hybrid,
}


# Keyword arguments timm's create_model passes to every entry point.
TIMM_PLUMBING = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
# What timm's resolve_data_config and DistillationTeacher read from a model: these nets take
# 32x32 inputs normalised with CIFAR-100's statistics.
CIFAR_PRETRAINED_CFG = dict(input_size=(3, 32, 32), mean=CIFAR100_MEAN, std=CIFAR100_STD,
                            crop_pct=DEFAULT_CROP_RATIO, interpolation="bilinear")


def _register(name, build):
    def entrypoint(pretrained=False, num_classes=100, **kwargs):
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights (pass --teacher-checkpoint)")
        unknown = set(kwargs) - TIMM_PLUMBING
        if unknown:
            raise ValueError(f"{name} takes no options {sorted(unknown)} (only num_classes)")
        model = build(num_classes)
        model.pretrained_cfg = dict(CIFAR_PRETRAINED_CFG, architecture=name,
                                    num_classes=num_classes)
        return model

    entrypoint.__name__ = name
    entrypoint.__doc__ = f"CIFAR-style {name} (32x32 inputs)."
    entrypoint.__module__ = __name__
    return register_model(entrypoint)


for _name, _build in CIFAR_MODELS.items():
    _register(_name, _build)
