"""The CIFAR-style networks of the KD literature (32x32 inputs), registered in timm's registry.

``timm.create_model("resnet8x4", num_classes=100)`` works once ``fastkd.models`` is imported.
Architectures follow the common KD benchmark definitions (CRD, mdistiller): CIFAR ResNets with
three stages of basic blocks, pre-activation wide ResNets, and VGG with batch norm. Each model
has timm's interface (``forward_features``, ``forward_head(pre_logits=)``,
``forward_intermediates``, ``feature_info``, ``num_features``), so every distiller, HCD's stage
taps included, works with them. ``vgg13`` is registered as ``vgg13_cifar``: timm's ``vgg13`` is
the ImageNet network.
"""

from timm.models import register_model
from torch import nn


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


CIFAR_MODELS = {
    "resnet8x4": lambda classes: cifar_resnet(8, (32, 64, 128, 256), classes),
    "resnet32x4": lambda classes: cifar_resnet(32, (32, 64, 128, 256), classes),
    "resnet20": lambda classes: cifar_resnet(20, (16, 16, 32, 64), classes),
    "resnet56": lambda classes: cifar_resnet(56, (16, 16, 32, 64), classes),
    "resnet110": lambda classes: cifar_resnet(110, (16, 16, 32, 64), classes),
    "wrn_16_2": lambda classes: wide_resnet(16, 2, classes),
    "wrn_40_2": lambda classes: wide_resnet(40, 2, classes),
    "vgg8": lambda classes: vgg(((64,), (128,), (256,), (512,), (512,)), classes),
    "vgg13_cifar": lambda classes: vgg(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
                                       classes),
}


# Keyword arguments timm's create_model passes to every entry point.
TIMM_PLUMBING = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}


def _register(name, build):
    def entrypoint(pretrained=False, num_classes=100, **kwargs):
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights (pass --teacher-checkpoint)")
        unknown = set(kwargs) - TIMM_PLUMBING
        if unknown:
            raise ValueError(f"{name} takes no options {sorted(unknown)} (only num_classes)")
        return build(num_classes)

    entrypoint.__name__ = name
    entrypoint.__doc__ = f"CIFAR-style {name} (32x32 inputs)."
    entrypoint.__module__ = __name__
    return register_model(entrypoint)


for _name, _build in CIFAR_MODELS.items():
    _register(_name, _build)
