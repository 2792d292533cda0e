"""Checkpoints that are never half-written, hold only tensors and plain values (so that
``torch.load(weights_only=True)`` and timm read them), and the settings a resumed run must share.

fastkd's checkpoint is a dict whose ``state_dict`` (and ``state_dict_ema`` with EMA) holds the
student's weights under timm's own key names: ``timm.models.load_checkpoint(model, path)`` loads
the student from it. ``load_weights`` reads the other way round: a model's weights from fastkd's
checkpoints and from any usual file (a plain or DDP state dict, a timm training checkpoint,
``.safetensors``).
"""

import argparse
import os
import pickle
import random
import zipfile

import numpy as np
import timm.models
import torch

from ..files import atomic_write
from .refusal import Refused

# Options that say how a job runs, not what it trains: a resumed run may change them. Every
# other option is the checkpoint's (``check_resumable``); the loader's worker count is one of
# these because no random draw depends on it (``fastkd.data.order``).
RUN_OPTIONS = {"config", "output", "experiment", "resume", "eval_only", "log_interval", "workers",
               "recovery_interval", "bad_images", "allow_untrained_teacher"}
# What the trainer records beside the options, in the checkpoint's args but not in args.yaml
# (no flag takes it back): the folder of the demo's CE baseline, for a resumed run's table.
RUN_RECORDS = {"demo_baseline"}

# The one class beyond tensors and plain values that a checkpoint may hold: timm's training
# checkpoints store their args as an argparse.Namespace (timm's own loader allows it too).
READABLE_CLASSES = [argparse.Namespace]

# How many keys of each kind (missing, unexpected, other shape) a mismatch error names.
SHOWN_KEYS = 3


def save_atomic(state, path):
    """``torch.save`` through ``atomic_write``: a crash or power loss leaves the previous file."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load(path, flag=None):
    """The checkpoint at ``path``, on the CPU, read without running any pickled code; a file
    that cannot be read is refused naming it (and ``flag``, the option that gave it)."""
    try:
        with torch.serialization.safe_globals(READABLE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises whatever unpickling a bad file raises
        raise Refused(_cannot_read(path, _reason(path, error), flag)) from None


# What resuming reads of a checkpoint before its parts are loaded one by one.
RESUME_ENTRIES = ("args", "epoch", "state_dict", "optimizer", "scaler", "best_top1", "updates",
                  "summary", "bad_images")


def missing_entry(state, entries):
    """The first of ``entries`` that the loaded checkpoint ``state`` lacks (a file of another
    program: a bare state dict, a list), or None; ``args`` must be a mapping."""
    if not isinstance(state, dict):
        return entries[0]
    for entry in entries:
        if entry not in state or (entry == "args" and not isinstance(state[entry], dict)):
            return entry
    return None


def missing_resume_entry(state):
    """``missing_entry`` of what resuming reads, the random state (``ranks`` or, from a
    single-process run, ``rng``) included."""
    missing = missing_entry(state, RESUME_ENTRIES)
    if missing is None and not (state.get("ranks") or state.get("rng")):
        return "rng"
    return missing


def _cannot_read(path, reason, flag=None):
    given = f" given to {flag}" if flag else ""
    return f"error: cannot read the checkpoint {path}{given} ({reason})"


def _reason(path, error):
    """Why ``error`` kept ``path`` from being read, in a line. torch's own words for a refused
    pickle are a page of advice about weights_only=False, which fastkd never uses (timm wraps
    them in a RuntimeError)."""
    objects = _pickled_objects(path)
    if objects:
        return "it holds Python objects, not only tensors and plain values: " + ", ".join(objects)
    if (any(isinstance(cause, pickle.UnpicklingError) for cause in (error, error.__cause__))
            or not (zipfile.is_zipfile(path) or str(path).endswith(".safetensors"))):
        # torch.save writes zip files; other bytes fail anywhere in unpickling (KeyError: 101)
        return "not a file that torch.save or safetensors wrote, or a damaged one"
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _pickled_objects(path):
    """The classes and functions pickled in the torch file ``path`` that fastkd does not read."""
    try:
        with torch.serialization.safe_globals(READABLE_CLASSES):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file at all: the caller reports its own error
        return []


def load_weights(model, path, *, flag="--teacher-checkpoint", use_ema=True, arch=None):
    """Load ``model``'s weights from the file ``path`` (given to the option ``flag``).

    The file is read by timm's loader: a plain state dict, a dict with ``state_dict`` /
    ``model`` (``state_dict_ema`` / ``model_ema`` first when ``use_ema``), DDP's ``module.``
    prefix and ``.safetensors`` all work. Keys and shapes must match the model exactly; if they
    do not, the error names a few of each kind and the model (``arch``, its timm name, by
    default timm's record of it) the file should be a checkpoint of.
    """
    if not os.path.isfile(path):  # before timm, which would log an error of its own
        raise Refused(_cannot_read(path, "no such file", flag))
    try:
        weights = timm.models.load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as error:  # whatever torch, safetensors or timm raise on a bad file
        raise Refused(_cannot_read(path, _reason(path, error), flag)) from None
    _check_fits(model, weights, f"{flag} {path}", arch)
    model.load_state_dict(weights)


def _check_fits(model, weights, source, arch):
    """Refuse ``weights`` (from ``source``, for messages) unless they fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [f"{key} {_shape(value)}" for key, value in expected.items() if key not in weights]
    unexpected = [f"{key} {_shape(value)}" for key, value in weights.items()
                  if key not in expected]
    reshaped = [f"{key} {_shape(weights[key])} (model: {_shape(value)})"
                for key, value in expected.items()
                if key in weights and _shape(weights[key]) != _shape(value)]
    problems = [_first_few(keys, what) for keys, what in ((missing, "missing"),
                                                          (unexpected, "unexpected"),
                                                          (reshaped, "with another shape"))
                if keys]
    if problems:
        name = arch or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        name = name or type(model).__name__
        classes = getattr(model, "num_classes", None)
        with_classes = f" with {classes} classes" if classes else ""
        raise Refused(f"error: {source} does not fit the model: {'; '.join(problems)}; "
                      f"is it a checkpoint of {name}{with_classes}?")


def _first_few(keys, what):
    noun = "key" if len(keys) == 1 else "keys"
    more = ", ..." if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {noun} {what}: {', '.join(keys[:SHOWN_KEYS])}{more}"


def _shape(value):
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def data_config_of(path, flag=None):
    """The input normalisation (``{"mean", "std", "input_size", "crop_pct"}``) a fastkd
    checkpoint's model was trained with, or None for any other file (``flag``: ``load``'s)."""
    if str(path).endswith(".safetensors"):  # tensors only
        return None
    state = load(path, flag)
    return state.get("data_config") if isinstance(state, dict) else None


def rng_state():
    """This process's random generators (torch, numpy, python, CUDA), for an exact resume, as
    tensors and plain values only: a checkpoint holding them reads with ``weights_only``."""
    generator, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"generator": generator, "key": torch.from_numpy(key.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate(),  # a tuple of ints (and a float or None)
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    """Restore the generators ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["generator"], numpy_state["key"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(saved_args, args, saved_processes, processes):
    """Refuse, before any work, to resume a run with a setting that changes what it trains: every
    option but ``RUN_OPTIONS`` must be the checkpoint's, each difference named with both values.
    ``--epochs`` may grow (the schedule is recomputed); the batch size is compared as the global
    batch (``saved_processes`` and ``processes`` ranks), so that a run may resume on another
    number of processes with the same global batches."""
    changed = changed_options(saved_args, args, skip=("epochs", "batch_size"))
    if args.epochs < saved_args["epochs"]:
        changed.append(f"--epochs {saved_args['epochs']} -> {args.epochs} (it may only grow)")
    saved_batch, batch = saved_args["batch_size"], args.batch_size
    if saved_batch * saved_processes != batch * processes:
        changed.append(f"--batch-size {saved_batch} x {saved_processes} processes -> {batch} x "
                       f"{processes} processes (the global batch must stay "
                       f"{saved_batch * saved_processes})")
    if changed:
        raise Refused("error: --resume refuses a run with different settings: "
                      + "; ".join(changed))


def changed_options(saved_args, args, skip=()):
    """Each option of ``args`` that ``saved_args`` (a checkpoint's or a record's options) holds
    with another value, as "--flag saved -> now": all but ``RUN_OPTIONS``, ``RUN_RECORDS`` and
    ``skip``, and those ``saved_args`` does not hold (options newer than it)."""
    changed = []
    for name, value in vars(args).items():
        if name in RUN_OPTIONS | RUN_RECORDS or name in skip or name not in saved_args:
            continue
        if name == "teacher_checkpoint" and value is None:  # the demo's, found later
            continue
        if _normalise(saved_args[name]) != _normalise(value):
            changed.append(f"{_flag(name)} {saved_args[name]!r} -> {value!r}")
    return changed


def _flag(name):
    return f"--{name.replace('_', '-')}"


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(item) for item in value)
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    return value


# summary.csv's columns that time a run rather than describe what it trained.
TIMING_COLUMNS = {"img_per_s", "epoch_time", "data_wait", "max_memory_gib"}


def differences(first, second):
    """What two fastkd checkpoints disagree on, ignoring timings and the run's own options: the
    student and EMA weights, the task's modules, the optimiser and scaler state, the place in
    training, the best score and the summary rows. An empty list: the runs are bit-identical."""
    found = []

    def compare(a, b, where):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                gap = ((a.double() - b.double()).abs().max().item()
                       if a.shape == b.shape and a.numel() else float("nan"))
                found.append(f"{where} (max difference {gap:.3g})")
        elif isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key in a and key in b:
                    compare(a[key], b[key], f"{where}.{key}")
                else:
                    found.append(f"{where}.{key} (in one only)")
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for index, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{index}]")
        elif a != b:
            found.append(f"{where} ({a!r} != {b!r})")

    for key in ("state_dict", "state_dict_ema", "task_state", "task_state_ema", "optimizer",
                "scaler", "epoch", "step", "updates", "best_top1"):
        compare(first.get(key), second.get(key), key)
    rows = [[{name: value for name, value in row.items() if name not in TIMING_COLUMNS}
             for row in state["summary"]] for state in (first, second)]
    compare(rows[0], rows[1], "summary")
    return found
