"""A run's folder, ``OUTPUT/<run>/``: which one a run writes to, and the files other than its
checkpoints (``args.yaml``, ``summary.csv``, ``curves.png``, ``bad_images.txt``). Only rank 0
calls these."""

import csv
import fcntl
import importlib.metadata
import os
import subprocess
import sys
import time

import yaml
from timm.utils import get_outdir

from ..files import atomic_write
from . import checkpoint
from .refusal import Refused

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


def check_not_behind(path, position):
    """``--resume path`` (saved at ``position``, (epoch, step)) must not take its run back:
    resuming writes into the checkpoint's folder, over a later last.pth."""
    last = os.path.join(os.path.dirname(os.path.abspath(path)), LAST)
    if os.path.abspath(path) == last or not os.path.isfile(last):
        return
    state = checkpoint.load(last)
    later = (state["epoch"], state.get("step", 0))
    if later > tuple(position):
        raise Refused(
            f"error: --resume {path} was saved at {describe(*position)} but {last} at "
            f"{describe(*later)}: resuming in that folder would overwrite the later steps; "
            f"resume {last}, or copy {os.path.basename(path)} into a new folder to continue "
            "from it there")


def describe(epoch, step):
    """A checkpoint's place, in words: "epoch 3", "epoch 3 step 120"."""
    return f"epoch {epoch} step {step}" if step else f"epoch {epoch}"


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
    """``args.yaml``: the run's options as resolved, headed by comments naming the library
    versions and the git commit of the code that ran. ``--config args.yaml`` takes it back (the
    config file the run read, if any, is already folded into the values)."""
    with atomic_write(os.path.join(folder, "args.yaml")) as handle:
        handle.write("".join(f"# {line}\n" for line in provenance()))
        yaml.safe_dump({key: list(value) if isinstance(value, tuple) else value
                        for key, value in vars(args).items()
                        if key != "config" and key not in checkpoint.RUN_RECORDS}, handle)


def provenance():
    """Lines naming Python, torch, timm, triton, DALI and fastkd's git commit."""
    import platform

    versions = {"python": platform.python_version()}
    for name, module in (("torch", "torch"), ("timm", "timm"), ("triton", "triton"),
                         ("dali", "nvidia.dali"), ("torchvision", "torchvision")):
        versions[name] = installed_version(module)
    return [", ".join(f"{name} {version}" for name, version in versions.items()),
            f"fastkd commit {git_commit()}"]


def installed_version(module):
    """``module``'s version, or "not installed". A module not yet imported is not imported for
    it (triton, or DALI with its CUDA libraries, in a run that uses neither): its package's
    metadata is read instead. DALI's package is named for its CUDA (nvidia-dali-cuda130, ...)."""
    if module in sys.modules:
        return sys.modules[module].__version__
    if module == "nvidia.dali":
        return next((package.version for package in importlib.metadata.distributions()
                     if (package.metadata["Name"] or "").lower().startswith("nvidia-dali")),
                    "not installed")
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit():
    """The checkout's HEAD (with ``-dirty`` if files changed), or "unknown" outside git."""
    source = os.path.dirname(os.path.abspath(__file__))

    def git(*arguments):
        return subprocess.run(["git", "-C", source, *arguments], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        # An installed copy may sit inside some other repository (a venv in a checkout).
        if not os.path.samefile(os.path.join(top, "fastkd", "engine"), source):
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def plot_curves(folder, rows, title):
    """``curves.png``: training losses, evaluation accuracy and the learning rate per epoch,
    titled ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]

    def curve(axes, key, label):  # markers: a one-epoch run still shows its point
        axes.plot(epochs, [row.get(key, float("nan")) for row in rows], "o-", label=label)

    figure, (losses, accuracy, rate) = plt.subplots(1, 3, figsize=(14, 4))
    for key in rows[-1]:
        if key.startswith("train_") or key == "eval_loss":
            curve(losses, key, key.replace("train_", "train ").replace("eval_", "eval "))
    losses.set(xlabel="epoch", ylabel="loss", yscale="log")
    losses.legend()
    for key in rows[-1]:
        if key.startswith("eval_") and key[-4:] in ("top1", "top5"):
            curve(accuracy, key, key[5:].replace("_", " "))
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)")
    accuracy.legend()
    curve(rate, "lr", "lr")
    rate.set(xlabel="epoch", ylabel="learning rate")
    figure.suptitle(title)
    # Fixed margins: tight_layout would draw the figure once more to measure it (a third of the
    # plot's time).
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.87, wspace=0.25)
    with atomic_write(os.path.join(folder, "curves.png"), "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
