"""timm's training augmentations for the loaders: the random-resized crop and flip (``--scale``,
``--ratio``, ``--hflip``), auto-augment (timm's ``--aa`` strings) and random erasing
(``--reprob``, ``--remode``, ``--recount``).

The torchvision loader runs timm's own transforms, in timm's order (``compose_transform``): the
auto-augment policy on the PIL image after crop and flip, random erasing on each normalised
sample. The DALI loader runs DALI's implementation of a policy where DALI has one equal to timm's
(``dali.py``) and timm's random erasing on each normalised batch, on the training device.
"""

from dataclasses import dataclass

from PIL import Image
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

RE_MODES = ("const", "rand", "pixel")  # zeros, one normal colour per box, normal noise per pixel


@dataclass(frozen=True)
class CropFlip:
    """The training crop and flip, with timm's defaults: a random-resized crop of an area
    fraction drawn from ``scale`` and an aspect ratio log-uniform in ``ratio`` (torchvision's
    RandomResizedCrop), then a horizontal flip with probability ``hflip``. Bad values raise
    ValueError naming them."""

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __post_init__(self):
        scale, ratio = tuple(map(float, self.scale)), tuple(map(float, self.ratio))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be two area fractions 0 < low <= high <= 1, got "
                             f"{self.scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be two aspect ratios 0 < low <= high, got {self.ratio}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)


def timm_auto_augment(config, image_size, mean):
    """timm's PIL transform for the auto-augment string ``config`` ("v0", "original-mstd0.5",
    "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", ...), with the settings timm's
    ``transforms_imagenet_train`` gives it: absolute translations up to 45% of the image side,
    the normalisation mean as fill colour, AugMix translations up to 30%; and the bilinear
    resampling of this loader's crop. A string timm does not accept raises ValueError."""
    hparams = dict(translate_const=int(image_size * 0.45),
                   img_mean=tuple(min(255, round(255 * value)) for value in mean),
                   interpolation=Image.Resampling.BILINEAR)
    try:
        if config.startswith("rand"):
            return rand_augment_transform(config, hparams)
        if config.startswith("augmix"):
            return augment_and_mix_transform(config, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(config, hparams)
    except (AssertionError, ValueError) as error:  # timm checks its strings with assert
        raise ValueError(f"auto_augment (--aa) {config!r} is not a timm auto-augment string "
                         f"({error})") from error


def random_erasing(probability, mode, count, device):
    """timm's RandomErasing for tensors on ``device``: with ``probability`` per image, 1 to
    ``count`` boxes filled as ``mode`` says (see RE_MODES); None when ``probability`` is 0."""
    if not 0 <= probability <= 1:
        raise ValueError(f"re_prob (--reprob) must be in [0, 1], got {probability}")
    if mode not in RE_MODES:
        raise ValueError(f"re_mode (--remode) must be one of {RE_MODES}, got {mode!r}")
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"re_count (--recount) must be an integer >= 1, got {count!r}")
    if probability == 0:
        return None
    return RandomErasing(probability, mode=mode, max_count=count, device=device)


def compose_transform(steps, mean, std, auto_augment=None, random_erasing=None):
    """PIL ``steps`` (crop, flip, resize), then ``auto_augment`` (a PIL transform), the tensor
    normalised by ``mean`` and ``std``, then ``random_erasing``: timm's order."""
    steps = [*steps, auto_augment] if auto_augment else list(steps)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if random_erasing:
        steps.append(random_erasing)
    return transforms.Compose(steps)
