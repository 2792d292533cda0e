"""Folder-per-class image datasets (ImageNet layout): listing, labels and checks at start.

``scan_image_folder(root)`` returns the sorted classes and ``(path, label)`` samples the way
torchvision's ImageFolder numbers them, so the DALI and torchvision loaders agree on labels.

Corrupted files: every file's header is checked when the dataset is scanned; a file that is not
an image (empty, wrong or missing magic bytes) is set aside in ``ImageFolder.bad`` with its reason,
for the caller to skip or report (``bad_images``). A file with a valid header but a broken body is
not caught here: the torchvision loader replaces it when it meets it, and the DALI path decodes
every file once before the run (``verify.py``).
"""

import os
from dataclasses import dataclass, field, replace

from .bad_images import describe, logger

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Leading bytes of each accepted format (WebP: RIFF....WEBP, checked at offsets 0 and 8).
MAGIC_BYTES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


@dataclass(frozen=True)
class ImageFolder:
    root: str
    classes: tuple
    samples: tuple  # ((path, label), ...), sorted by class then file name; the readable ones
    bad: dict = field(default_factory=dict)  # {path: reason} of the files set aside

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def without(self, bad):
        """This folder with its samples named in ``bad`` ({path: reason}) moved to ``self.bad``;
        labels stay those of the class folders."""
        found = {path: bad[path] for path, _ in self.samples if path in bad}
        return replace(self, samples=tuple(sample for sample in self.samples
                                           if sample[0] not in found),
                       bad={**self.bad, **found})


def _header_problem(path):
    """None when the first bytes are those of an accepted format, else why the file is bad."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as error:
        return describe(error)
    if not head:
        return "empty file"
    if head.startswith(MAGIC_BYTES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (bad header)"


def scan_image_folder(root, check_files=True):
    """Classes and samples of ``root/<class>/<image>``; a clear error for a missing or empty
    directory or an empty class. What is not read is named in a warning: files of other formats
    (by extension), folders nested in a class folder, files beside the class folders (hidden
    files aside: ``.DS_Store`` and the like). With ``check_files``, files that are not images by
    their header go to ``bad`` instead of ``samples``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} does not exist (expected root/<class>/*.JPEG)")
    entries = list(os.scandir(root))
    classes = sorted(entry.name for entry in entries if entry.is_dir())  # as torchvision's
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-directories")
    skipped = {"file(s) beside the class folders": [
        entry.path for entry in entries if not entry.is_dir() and not entry.name.startswith(".")]}
    samples, empty = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(root, name)
        files = []
        for entry in os.scandir(directory):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                skipped.setdefault("folder(s) inside a class folder", []).append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.name)
            else:
                kind = os.path.splitext(entry.name)[1].lower() or "extension-less"
                skipped.setdefault(f"{kind} file(s)", []).append(entry.path)
        if not files:
            empty.append(directory)
        samples.extend((os.path.join(directory, file), label) for file in sorted(files))
    warn_skipped(root, {what: paths for what, paths in skipped.items() if paths})
    if empty:
        raise ValueError(f"class folders with no images ({len(empty)}): {', '.join(empty[:5])} "
                         f"(images are read with the extensions {' '.join(IMAGE_EXTENSIONS)}, "
                         "directly inside each class folder)")
    folder = ImageFolder(root, tuple(classes), tuple(samples))
    if not check_files:
        return folder
    problems = {path: _header_problem(path) for path, _ in samples}
    return folder.without({path: reason for path, reason in problems.items() if reason})


def warn_skipped(root, skipped):
    """One warning naming what the scan of ``root`` left out ({what: paths}), and why."""
    if not skipped:
        return
    parts = [f"{len(paths)} {what} (e.g. {sorted(paths)[0]})" for what, paths in skipped.items()]
    logger.warning("%s: not read: %s; images are read from %s/<class>/ with the extensions %s",
                   root, "; ".join(parts), root, " ".join(IMAGE_EXTENSIONS))


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
