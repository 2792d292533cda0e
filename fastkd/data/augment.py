"""timm's training augmentations for the loaders: the random-resized crop and flip (``--scale``,
``--ratio``, ``--hflip``), auto-augment (timm's ``--aa`` strings) and random erasing
(``--reprob``, ``--remode``, ``--recount``).

The torchvision loader runs timm's own transforms, in timm's order (``compose_transform``): the
auto-augment policy on the PIL image after crop and flip, random erasing on each normalised
sample. The DALI loader runs DALI's implementation of a policy where DALI has one equal to timm's
(``dali.py``) and timm's random erasing on each normalised batch, on the training device.
"""

import math

import torch
from PIL import Image
from timm.data import auto_augment as timm_policies
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from .crop_flip import CropFlip
from .order import seeded_globals

RE_MODES = ("const", "rand", "pixel")  # zeros, one normal colour per box, normal noise per pixel


def crop_params(height, width, generator, crop_flip=CropFlip()):
    """``(top, left, crop_height, crop_width)`` of a random-resized crop of a ``height`` x
    ``width`` image: torchvision's ``RandomResizedCrop.get_params`` (area fraction in
    ``crop_flip.scale``, aspect ratio log-uniform in ``crop_flip.ratio``, ten tries, then the
    central crop of the nearest ratio), with the same draws in the same order, from
    ``generator`` (host) instead of the global RNG. For the loaders that crop outside
    torchvision (nvJPEG, DALI), from a sample's own generator (``order.sample_seed``)."""
    area = height * width
    low, high = crop_flip.ratio
    # torchvision takes the logs in float32: the same values give the same crops.
    log_ratio = torch.log(torch.tensor(crop_flip.ratio)).tolist()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*crop_flip.scale,
                                                     generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(*log_ratio, generator=generator)).item()
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = torch.randint(0, height - crop_height + 1, (1,), generator=generator).item()
            left = torch.randint(0, width - crop_width + 1, (1,), generator=generator).item()
            return top, left, crop_height, crop_width
    if width / height < low:
        crop_width, crop_height = width, int(round(width / low))
    elif width / height > high:
        crop_width, crop_height = int(round(height * high)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def flip_drawn(generator, crop_flip=CropFlip()):
    """Whether to flip, drawn from ``generator`` after the crop (torchvision's order)."""
    return bool(torch.rand(1, generator=generator).item() < crop_flip.hflip)


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
            transform = rand_augment_transform(config, hparams)
        elif config.startswith("augmix"):
            transform = augment_and_mix_transform(config, {**hparams, "translate_pct": 0.3})
        else:
            transform = auto_augment_transform(config, hparams)
    except (AssertionError, ValueError) as error:  # timm checks its strings with assert
        raise ValueError(f"auto_augment (--aa) {config!r} is not a timm auto-augment string "
                         f"({error})") from error
    operations = getattr(transform, "ops", None) or [
        operation for sub_policy in transform.policy for operation in sub_policy]
    for operation in operations:
        if operation.aug_fn is timm_policies.posterize:
            operation.aug_fn = posterize
    return transform


def posterize(image, bits_to_keep, **_):
    """timm's posterize, with its 0 bits kept: timm's levels give 0 (v0's Posterize at level 2,
    RandAugment's PosterizeIncreasing at 10), which Pillow 13 refuses ("bits must be between or
    equal to 1 and 8") where earlier Pillows made the image black, the operation's limit."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_policies.posterize(image, bits_to_keep)


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


def erase_samples(images, random_erasing, seeds):
    """``random_erasing`` (timm's, see ``random_erasing``) of each image of the batch ``images``
    in place, its draws seeded by that sample's entry of ``seeds`` (``order.erase_seed``): for the
    loaders that erase on the training device after decoding (DALI, nvJPEG)."""
    for image, seed in zip(images, seeds):
        with seeded_globals(seed, images.device):
            random_erasing(image)
    return images
