"""The built-in demo dataset: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10
classes, no download), written once as a folder-per-class JPEG tree so the demo exercises the
same file readers as ImageNet."""

import json
import os

import numpy as np
from PIL import Image

from ..files import atomic_write, user_cache_dir
from .written import MANIFEST, complete_manifest, foreign_entries

IMAGE_SIZE = 32
VAL_EVERY = 5  # every 5th image of each class goes to val: a fixed, deterministic split
SPLITS = ("train", "val")
CLASS_FOLDERS = tuple(str(label) for label in range(10))


def _expected_files():
    from sklearn.datasets import load_digits

    digits = load_digits()
    files, per_class = {}, {}
    for image, label in zip(digits.images, digits.target):
        index = per_class.get(int(label), 0)
        per_class[int(label)] = index + 1
        split = "val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"
        files[f"{split}/{label}/{index:04d}.jpeg"] = image
    return files


def foreign_demo_entries(root):
    """None if ``root`` may hold the demo tree, else what else is there, in words
    (``written.foreign_entries``)."""
    return foreign_entries(root, SPLITS, CLASS_FOLDERS, "demo", "demo", "its digits")


def build_demo_dataset(root):
    """Write the digits tree under ``root`` (``train/<digit>/*.jpeg``, ``val/<digit>/*.jpeg``),
    unless a complete one is already there; returns ``root``. A tree with a missing file is
    rebuilt. Images are upscaled to 32x32 RGB (grey levels 0..16 -> 0..255). A folder holding
    anything else is refused (ValueError) rather than written into."""
    if complete_manifest(root) is not None:
        return root
    problem = foreign_demo_entries(root)
    if problem:
        raise ValueError(f"{root} {problem}")
    files = _expected_files()
    for name, image in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = np.round(np.asarray(image) * (255 / 16)).astype(np.uint8)
        picture = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        picture.convert("RGB").save(path, quality=95)
    # The manifest goes last: its presence means every file before it was written.
    with atomic_write(os.path.join(root, MANIFEST)) as handle:
        json.dump({"files": sorted(files)}, handle)
    return root


def default_demo_root():
    return os.path.join(user_cache_dir(), "digits")
