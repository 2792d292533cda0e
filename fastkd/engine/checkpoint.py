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

# Options that define what is being trained: a resumed run must not change them.
IDENTITY_OPTIONS = ("model", "model_kwargs", "teacher", "teacher_kwargs", "distiller", "dataset",
                    "num_classes", "img_size", "input_size", "model_ema", "hcd_num_sub",
                    "hcd_stages", "hcd_cfm")

# The one class beyond tensors and plain values that a checkpoint may hold: timm's training
# checkpoints store their args as an argparse.Namespace (timm's own loader allows it too).
READABLE_CLASSES = [argparse.Namespace]

# How many keys of each kind (missing, unexpected, other shape) a mismatch error names.
SHOWN_KEYS = 3


def save_atomic(state, path):
    """``torch.save`` through ``atomic_write``: a crash or power loss leaves the previous file."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load(path):
    """The checkpoint at ``path``, on the CPU, read without running any pickled code."""
    try:
        with torch.serialization.safe_globals(READABLE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises whatever unpickling a bad file raises
        raise SystemExit(_cannot_read(path, _reason(path, error))) from None


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
        raise SystemExit(_cannot_read(path, "no such file", flag))
    try:
        weights = timm.models.load_state_dict(path, use_ema=use_ema, weights_only=True)
    except Exception as error:  # whatever torch, safetensors or timm raise on a bad file
        raise SystemExit(_cannot_read(path, _reason(path, error), flag)) from None
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
        raise SystemExit(f"error: {source} does not fit the model: {'; '.join(problems)}; "
                         f"is it a checkpoint of {name}{with_classes}?")


def _first_few(keys, what):
    noun = "key" if len(keys) == 1 else "keys"
    more = ", ..." if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {noun} {what}: {', '.join(keys[:SHOWN_KEYS])}{more}"


def _shape(value):
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def data_config_of(path):
    """The input normalisation (``{"mean", "std", "input_size", "crop_pct"}``) a fastkd
    checkpoint's model was trained with, or None for any other file."""
    if str(path).endswith(".safetensors"):  # tensors only
        return None
    state = load(path)
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


def check_resumable(saved_args, args):
    """Refuse to resume with different model, teacher, distiller or data settings."""
    changed = [f"--{name.replace('_', '-')} {saved_args.get(name)!r} -> {getattr(args, name)!r}"
               for name in IDENTITY_OPTIONS
               if _normalise(saved_args.get(name)) != _normalise(getattr(args, name, None))]
    if changed:
        raise SystemExit("error: --resume refuses a run with different settings: "
                         + "; ".join(changed))


def _normalise(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
