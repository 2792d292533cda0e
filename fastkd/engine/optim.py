"""Optimiser, learning-rate schedule, mixed precision and mixup, from timm's factories with timm
train.py's flag meanings (``--decay-epochs`` an interval, ``--decay-milestones`` a list,
``--warmup-lr`` the warm-up's first rate, ``--min-lr`` the cosine floor)."""

import dataclasses

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from .config import mixes


def create_optimizer(args, trainable_module, grad_scaler=False):
    """timm's optimiser over the trainable module (biases and norms without weight decay).

    With ``grad_scaler`` (fp16), the fused form where the optimiser has one (torch's SGD, Adam,
    AdamW): a GradScaler reads its found-inf flag on the host every step, a device sync, unless
    the optimiser applies the scale itself, which the fused ones do."""
    if grad_scaler:
        try:
            return create_optimizer_v2(trainable_module, **optimizer_kwargs(args), fused=True)
        except TypeError:  # no fused form: the GradScaler reads the flag
            pass
    return create_optimizer_v2(trainable_module, **optimizer_kwargs(args))


def create_scheduler(args, optimizer):
    """timm's per-epoch scheduler: ``scheduler.step(epoch)`` sets the rate of ``epoch``."""
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args))
    return scheduler


def create_mixup(args, num_classes):
    """timm's Mixup/CutMix (soft targets, label smoothing folded in), or None when off."""
    if not mixes(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                 cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(args, device, log):
    """Set ``args.amp`` and ``args.amp_dtype`` to what trains on ``device``, so that args.yaml and
    the checkpoints record it: on a CPU autocast runs bfloat16, and a CPU without bf16
    instructions (where autocast is 14-43x slower than fp32) trains fp32."""
    if not args.amp or device.type != "cpu":
        return
    if not cpu_has_bf16():
        log("warning: --amp ignored: this CPU has no bf16 instructions, where autocast is 14-43x "
            "slower than fp32; training fp32 (args.yaml records amp: false)")
        args.amp = False
    elif args.amp_dtype != "bfloat16":
        log(f"--amp on the CPU trains bfloat16, not {args.amp_dtype} (args.yaml records it)")
        args.amp_dtype = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Autocast:
    """A run's ``torch.autocast`` settings: ``autocast(device_type)`` is the context."""

    enabled: bool
    dtype: torch.dtype | None = None

    def __call__(self, device_type):
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.enabled)

    @property
    def needs_grad_scaler(self):
        """fp16 underflows without loss scaling; bf16 has fp32's range."""
        return self.enabled and self.dtype == torch.float16


def autocast_settings(args):
    """The ``Autocast`` of the options ``resolve_amp`` settled."""
    return Autocast(True, getattr(torch, args.amp_dtype)) if args.amp else Autocast(False)
