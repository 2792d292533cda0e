"""A run's folder, ``OUTPUT/<run>/``: which one a run writes to, and the files other than its
checkpoints (``args.yaml``, ``summary.csv``, ``curves.png``, ``bad_images.txt``). Only rank 0
calls these."""

import csv
import os
import time

import yaml
from timm.utils import get_outdir

from .files import atomic_write

LAST = "last.pth"
BEST = "best.pth"


def choose_run_folder(args):
    """``(folder, checkpoint to resume or None)`` for this run; creates the folder.

    A new run never touches an existing folder: a name in use gets timm's ``-1``, ``-2``, ...
    suffix. ``--resume CHECKPOINT`` continues in the checkpoint's folder. ``--resume auto``
    continues ``OUTPUT/<experiment>`` from its ``last.pth`` when there is one and starts there
    afresh otherwise, so a job restarted by ``torchrun --max-restarts`` picks up where it was.
    """
    if args.resume == "auto":
        folder = os.path.join(args.output, args.experiment)
        os.makedirs(folder, exist_ok=True)
        last = os.path.join(folder, LAST)
        return folder, last if os.path.isfile(last) else None
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume)), args.resume
    name = args.experiment or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), args.distiller, args.model, args.dataset])
    return get_outdir(args.output, name, inc=True), None


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
