"""The training crop and flip settings, kept free of torch: the trainer's command line checks
``--scale``, ``--ratio`` and ``--hflip`` with them before torch is imported."""

from dataclasses import dataclass


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
