"""CIFAR-100 from the standard python archive directory (``cifar-100-python/`` with ``train``,
``test`` and ``meta``), read from a local path; served by the torchvision loader (the arrays are
already decoded, so DALI's JPEG path has nothing to add)."""

import os
import pickle

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .augment import compose_transform
from .common import CIFAR100_MEAN, CIFAR100_STD
from .crop_flip import CropFlip

ARCHIVE = "cifar-100-python"


def find_archive(path):
    """``path`` itself or ``path/cifar-100-python``, whichever holds train, test and meta."""
    for candidate in (path, os.path.join(path, ARCHIVE)):
        if all(os.path.isfile(os.path.join(candidate, name)) for name in ("train", "test", "meta")):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-100 archive at {path}: expected {os.path.join(path, ARCHIVE)}/ with the files "
        "train, test and meta (the python version of the dataset, extracted)")


def cifar_transform(training, image_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                    auto_augment=None, random_erasing=None, crop_flip=CropFlip()):
    """Random crop 32 with padding 4 + flip (with ``crop_flip.hflip``; its scale and ratio are
    for random-resized crops) for training; optionally resized (HCD's timm recipes train at
    224). ``auto_augment`` (timm's PIL policy, on the resized image) and ``random_erasing``
    (timm's, on the normalised tensor) are the training split's (see
    ``augment.compose_transform``)."""
    steps = []
    if training:
        steps = [transforms.RandomCrop(32, padding=4),
                 transforms.RandomHorizontalFlip(crop_flip.hflip)]
    if image_size != 32:
        steps.append(transforms.Resize(image_size))
    return compose_transform(steps, mean, std, auto_augment, random_erasing)


class CIFAR100(Dataset):
    def __init__(self, path, split, transform):
        archive = find_archive(path)
        with open(os.path.join(archive, "train" if split == "train" else "test"), "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        with open(os.path.join(archive, "meta"), "rb") as handle:
            self.classes = tuple(pickle.load(handle, encoding="latin1")["fine_label_names"])
        self.images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        self.images = self.images.transpose(0, 2, 3, 1)  # HWC for PIL
        self.labels = torch.as_tensor(entry["fine_labels"], dtype=torch.int64)
        self.transform = transform

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]
