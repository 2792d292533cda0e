"""Folder-per-class image datasets (ImageNet layout): listing, labels and checks at start.

``scan_image_folder(root)`` returns the sorted classes and ``(path, label)`` samples the way
torchvision's ImageFolder numbers them, so the DALI and torchvision loaders agree on labels.

Corrupted files: every file's header is checked when the dataset is scanned, and a file that is
not an image (wrong or missing magic bytes) fails the run at start with its path, rather than
killing a long run later. A file with a valid header but a truncated body is not caught here.
"""

import os
from dataclasses import dataclass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Leading bytes of each accepted format (WebP: RIFF....WEBP, checked at offsets 0 and 8).
MAGIC_BYTES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


@dataclass(frozen=True)
class ImageFolder:
    root: str
    classes: tuple
    samples: tuple  # ((path, label), ...), sorted by class then file name

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)


def _looks_like_image(path):
    with open(path, "rb") as handle:
        head = handle.read(12)
    return head.startswith(MAGIC_BYTES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def scan_image_folder(root, check_files=True):
    """Classes and samples of ``root/<class>/<image>``; a clear error for a missing or empty
    directory, an empty class, or (with ``check_files``) a file that is not an image."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} does not exist (expected root/<class>/*.JPEG)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-directories")
    samples, empty = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(root, name)
        files = sorted(entry.name for entry in os.scandir(directory)
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(directory)
        samples.extend((os.path.join(directory, file), label) for file in files)
    if empty:
        raise ValueError(f"class folders with no images ({len(empty)}): {', '.join(empty[:5])}")
    if check_files:
        broken = [path for path, _ in samples if not _looks_like_image(path)]
        if broken:
            raise ValueError(f"{len(broken)} file(s) are not images (bad header), e.g. "
                             f"{', '.join(broken[:5])}; remove or replace them")
    return ImageFolder(root, tuple(classes), tuple(samples))


def scan_split_folders(train_root, val_root, check_files=True):
    """Train and val folders that must hold the same classes."""
    train = scan_image_folder(train_root, check_files)
    val = scan_image_folder(val_root, check_files)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"train ({train_root}) and val ({val_root}) have different classes: only in train "
            f"{only_train[:5]}, only in val {only_val[:5]}")
    return train, val


def shard_bounds(size, rank, world_size):
    """Samples [start, stop) of shard ``rank``: the split DALI's readers use, so both loaders
    give each rank the same samples."""
    return size * rank // world_size, size * (rank + 1) // world_size
