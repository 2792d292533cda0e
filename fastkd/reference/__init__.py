"""The "reference" backend: each loss written the way its authors' code computes it. The oracle for
tests and the speed baseline for benchmarks; slow on purpose."""

from .kd import dkd_loss_reference, kd_loss_reference
from .ldrld import adaptive_decay_weight, ldrld_loss_reference

__all__ = [
    "adaptive_decay_weight",
    "dkd_loss_reference",
    "kd_loss_reference",
    "ldrld_loss_reference",
]
