"""Model-side helpers: the CIFAR-style nets of the KD literature (registered in timm on import)
and feature/embedding taps for any timm model."""

from . import cifar  # noqa: F401  (registers the CIFAR nets in timm)
