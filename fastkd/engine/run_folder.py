"""A run's folder, ``OUTPUT/<run>/``: which one a run writes to, and the files other than its
checkpoints (``args.yaml``, ``summary.csv``, ``curves.png``, ``bad_images.txt``). Only rank 0
calls these."""

import csv
import fcntl
import os
import time

import yaml
from timm.utils import get_outdir

from ..files import atomic_write

LAST = "last.pth"
BEST = "best.pth"


def checkpoint_to_resume(args):
    """The checkpoint this run continues from, or None: ``--resume CHECKPOINT``, or with
    ``--resume auto`` ``OUTPUT/<experiment>/last.pth`` when it exists, so that a job restarted by
    ``torchrun --max-restarts`` picks up where it was (and starts afresh before its first)."""
    if args.resume == "auto":
        last = os.path.join(args.output, args.experiment, LAST)
        return last if os.path.isfile(last) else None
    return args.resume


def create_run_folder(args, resume_from):
    """This run's folder, created and locked (see ``lock``). A new run never touches an existing
    folder: a name in use gets timm's ``-1``, ``-2``, ... suffix. A resumed run continues in its
    checkpoint's folder, and ``--resume auto`` in ``OUTPUT/<experiment>``."""
    if resume_from:
        folder = os.path.dirname(os.path.abspath(resume_from))
    elif args.resume == "auto":
        folder = os.path.join(args.output, args.experiment)
        os.makedirs(folder, exist_ok=True)
    else:
        name = args.experiment or "-".join(
            [time.strftime("%Y%m%d-%H%M%S"), args.distiller, args.model, args.dataset])
        folder = get_outdir(args.output, name, inc=True)
    lock(folder)
    return folder


_held_locks = {}  # folder -> open lock file, for the life of the process


def lock(folder):
    """Claim ``folder`` for this process until it exits, or refuse: two jobs resuming one run
    (or both ``--resume auto`` with one name) would write over each other. The kernel drops the
    lock when the process dies, so a restarted job can take it again."""
    folder = os.path.abspath(folder)
    if folder in _held_locks:
        return
    handle = open(os.path.join(folder, ".lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(f"error: {folder} is in use by another running job") from None
    _held_locks[folder] = handle


def write_args(folder, args):
    with atomic_write(os.path.join(folder, "args.yaml")) as handle:
        yaml.safe_dump({key: list(value) if isinstance(value, tuple) else value
                        for key, value in vars(args).items()}, handle)


def write_summary(folder, rows):
    """``summary.csv``, one row per finished epoch, rewritten whole from the run's history."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(os.path.join(folder, "summary.csv"), newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_bad_images(folder, bad):
    """``bad_images.txt``: the image files the run skipped, ``path<TAB>reason`` per line."""
    with atomic_write(os.path.join(folder, "bad_images.txt")) as handle:
        handle.writelines(f"{path}\t{bad[path]}\n" for path in sorted(bad))


def plot_curves(folder, rows):
    """``curves.png``: training losses and evaluation accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for key in rows[-1]:
        if key.startswith("train_"):
            losses.plot(epochs, [row.get(key, float("nan")) for row in rows], label=key[6:])
    losses.set(xlabel="epoch", ylabel="train loss", yscale="log")
    losses.legend()
    for key in ("eval_top1", "eval_top5"):
        accuracy.plot(epochs, [row[key] for row in rows], label=key[5:])
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)")
    accuracy.legend()
    figure.tight_layout()
    with atomic_write(os.path.join(folder, "curves.png"), "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
