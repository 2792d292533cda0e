"""Which split evaluation reads (the trainer's ``--val-split``): the held-out splits each
dataset has. One check, used by the command line (before torch) and by ``create_loaders``."""

import os

from .demo import SPLITS as DEMO_SPLITS
from .glyphs import SPLITS as GLYPH_SPLITS

TRAIN = "train"
# The splits of the datasets with a fixed layout (CIFAR-100's "val" is its test batch; synthetic
# data makes one evaluation set). A folder dataset's splits are the folders under its data dir.
FIXED_SPLITS = {"demo": DEMO_SPLITS, "glyphs": GLYPH_SPLITS, "cifar100": (TRAIN, "val"),
                "synthetic": (TRAIN, "val")}


def eval_split_problem(dataset, split):
    """Why evaluation cannot read ``split`` of ``dataset``, in words that follow the split's name
    (None if it can): never the training split, whose scores would pass for held-out ones; a
    fixed layout's own held-out splits only. (That a folder dataset's split is a folder under its
    data dir is checked where the data dir is.)"""
    if not split or os.sep in split or split in (".", ".."):
        return "must be a folder name"
    if split == TRAIN:
        return ("is the training split: evaluation would score images the model learns from; "
                "give a held-out split")
    if dataset in FIXED_SPLITS:
        held_out = [name for name in FIXED_SPLITS[dataset] if name != TRAIN]
        if split not in held_out:
            return f"is not a split of {dataset} (it has {', '.join(held_out)})"
    return None
