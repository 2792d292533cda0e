"""What the loaders share: the interface the trainer reads them through (``Loader``),
normalisation constants and their check, eval resize rule, the batch hand-off to the training
device and where fastkd keeps its per-user files."""

import math
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DEFAULT_CROP_RATIO = 224 / 256  # eval: resize the shorter side to crop / ratio, centre crop


@runtime_checkable
class Loader(Protocol):
    """What the trainer uses of a loader (``TorchLoader``, ``NvJpegLoader``, ``DaliLoader``,
    ``SyntheticLoader``). Iterating yields ``(images [B, 3, H, W], labels [B])`` on the training
    device, from the step ``set_epoch`` set; the whole of a resumed run's state is that
    ``(epoch, start_step)``: every draw is a function of it and the seed (``order``)."""

    num_classes: int
    dataset_size: int  # samples of the split, across ranks
    bad_images: dict  # {path: reason} of this split's files known bad in this process

    def set_epoch(self, epoch: int, start_step: int = 0,
                  slots: Sequence[int] | None = None) -> None:
        """Read ``epoch`` (its permutation and draws) from its global batch ``start_step``; or,
        given ``slots``, those sample indices in that order, with ``epoch``'s augmentations, in
        batches of the batch size (the last one short)."""

    def __len__(self) -> int:
        """Batches this rank reads in a whole epoch (training: whatever ``start_step``), or of
        the ``slots`` given."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from its start step; each pass starts there again."""

    def exclude(self, bad: dict) -> None:
        """Take files other ranks found bad ({path: reason}), so none is read again."""

    def start(self) -> None:
        """Start any worker processes now, before the run's threads (a fork beside a running
        thread can hang)."""

    def close(self) -> None:
        """Stop workers and threads now rather than at interpreter shutdown."""


def check_normalisation(mean, std):
    """``mean`` and ``std`` as 3-tuples of floats (RGB, in [0, 1] pixel units), std > 0."""
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (RGB), std > 0: got mean={mean}, "
                         f"std={std}")
    return mean, std


def eval_resize(image_size, crop_ratio=DEFAULT_CROP_RATIO):
    return int(math.floor(image_size / crop_ratio))


def to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).long().view(-1)
