"""What the datasets fastkd writes itself (the digits demo, the glyphs) share: the manifest that
marks a tree complete, and the refusal of a folder that holds anything else (the builder writes
into it, so it must not be a folder of someone's own images)."""

import json
import os

from .verify import CACHE_NAME

MANIFEST = "manifest.json"  # written last: its presence means every file it lists was written


def complete_manifest(root):
    """The manifest of the tree under ``root`` if every file it lists is there, else None."""
    try:
        with open(os.path.join(root, MANIFEST)) as handle:
            manifest = json.load(handle)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if all(os.path.isfile(os.path.join(root, name)) for name in files) else None


def foreign_entries(root, splits, class_folders, owner, dataset, contents):
    """None if ``root`` may hold the ``splits``/``class_folders`` tree: missing, empty, or holding
    only the tree's own files (complete or half-written; the manifest, the verification cache and
    their temporary and lock files); else what else is there, in words naming ``owner``,
    ``--dataset dataset`` and what it writes (``contents``)."""
    if not os.path.isdir(root):
        return None
    foreign = [name for name in os.listdir(root) if name not in splits
               and not name.startswith((MANIFEST, CACHE_NAME))]
    for split in splits:
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            foreign += [f"{split}/{name}" for name in os.listdir(folder)
                        if name not in class_folders]
        elif os.path.exists(folder):
            foreign.append(split)
    if not foreign:
        return None
    shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
    return (f"holds files that are not the {owner}'s ({shown}): --dataset {dataset} writes "
            f"{contents} there; give a new or empty folder, or --dataset folder to train on your "
            "own images")
