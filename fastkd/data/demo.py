"""The built-in demo dataset: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10
classes, no download), written once as a folder-per-class JPEG tree so the demo exercises the
same file readers as ImageNet."""

import json
import os

import numpy as np
from PIL import Image

from ..files import user_cache_dir
from .verify import CACHE_NAME

IMAGE_SIZE = 32
VAL_EVERY = 5  # every 5th image of each class goes to val: a fixed, deterministic split
MANIFEST = "manifest.json"


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


def _complete(root):
    try:
        with open(os.path.join(root, MANIFEST)) as handle:
            expected = json.load(handle)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.isfile(os.path.join(root, name)) for name in expected)


def foreign_demo_entries(root):
    """None if ``root`` may hold the demo tree: missing, empty, or holding only the demo's own
    files (a complete or half-written tree); else what else is there, in words. The demo writes
    into ``root``, so it must not be a folder of someone's own images."""
    if not os.path.isdir(root):
        return None
    classes = {str(label) for label in range(10)}
    # The splits, the manifest, the verification cache, and their temporary and lock files.
    foreign = [name for name in os.listdir(root) if name not in ("train", "val")
               and not name.startswith((MANIFEST, CACHE_NAME))]
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            foreign += [f"{split}/{name}" for name in os.listdir(folder) if name not in classes]
    if not foreign:
        return None
    shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
    return (f"holds files that are not the demo's ({shown}): --dataset demo writes its digits "
            "there; give a new or empty folder, or --dataset folder to train on your own images")


def build_demo_dataset(root):
    """Write the digits tree under ``root`` (``train/<digit>/*.jpeg``, ``val/<digit>/*.jpeg``),
    unless a complete one is already there; returns ``root``. A tree with a missing file is
    rebuilt. Images are upscaled to 32x32 RGB (grey levels 0..16 -> 0..255). A folder holding
    anything else is refused (ValueError) rather than written into."""
    if _complete(root):
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
    temporary = os.path.join(root, MANIFEST + ".tmp")
    with open(temporary, "w") as handle:
        json.dump({"files": sorted(files)}, handle)
    os.replace(temporary, os.path.join(root, MANIFEST))
    return root


def default_demo_root():
    return os.path.join(user_cache_dir(), "digits")
