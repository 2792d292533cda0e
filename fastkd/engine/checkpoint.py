"""Checkpoints that are never half-written, and the settings a resumed run must share."""

import torch

from ..files import atomic_write

# Options that define what is being trained: a resumed run must not change them.
IDENTITY_OPTIONS = ("model", "teacher", "distiller", "dataset", "num_classes", "image_size",
                    "hcd_num_sub", "hcd_stages", "hcd_cfm")


def save_atomic(state, path):
    """``torch.save`` through ``atomic_write``: a crash or power loss leaves the previous file."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises whatever unpickling a bad file raises
        raise SystemExit(f"error: cannot read the checkpoint {path} "
                         f"({type(error).__name__}: {error})") from None


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


def student_state_dict(path):
    """Model weights from a fastkd checkpoint (``model`` key) or a plain state dict."""
    state = load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        return state["model"]
    return state
