"""One options dataclass per method: the single source of its settings and their defaults.

The loss functions take their keyword defaults from these (``ldrld_loss(..., top_d=LDRLD.top_d)``),
the loss modules and distillers hold one instance, the trainer's flags are generated from the
fields (``--ldrld-top-d``, ``--hcd-num-sub``, ...) and the benchmarks run the defaults.

A field marked ``distiller_only`` configures the distiller around the loss (a weight, a warm-up,
which stages to tap) and is not an argument of the loss function. ``help`` is the flag's text and
``choices`` limits a string field.
"""

import dataclasses
import math
from dataclasses import dataclass, field


def option(default, help, *, distiller_only=False, choices=None):
    return field(default=default, metadata=dict(help=help, distiller_only=distiller_only,
                                                 choices=choices))


class MethodOptions:
    """What every options dataclass shares. Creating one checks its ``distiller_only`` fields
    (the loss functions check the others, against the batch they see): a weight or a warm-up is
    a finite number >= 0, stage numbers are positive integers, a string is one of its choices."""

    def __post_init__(self):
        for item in self.fields():
            if item.metadata["distiller_only"]:
                _check_distiller_option(item, getattr(self, item.name))

    @classmethod
    def fields(cls):
        return dataclasses.fields(cls)

    def loss_options(self):
        """The fields the method's loss function takes, as keyword arguments."""
        return {item.name: getattr(self, item.name) for item in self.fields()
                if not item.metadata["distiller_only"]}

    def replace(self, **changes):
        """A copy with ``changes``; an unknown name is a TypeError naming the valid ones."""
        names = {item.name for item in self.fields()}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option {', '.join(unknown)}; "
                            f"options: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


def _check_distiller_option(item, value):
    if item.metadata["choices"] is not None:
        if value not in item.metadata["choices"]:
            raise ValueError(f"{item.name} must be one of {item.metadata['choices']}, "
                             f"got {value!r}")
    elif isinstance(item.default, tuple):
        if not isinstance(value, tuple) or not all(
                isinstance(number, int) and not isinstance(number, bool) and number >= 1
                for number in value):
            raise ValueError(f"{item.name} must be a tuple of stage numbers (1, 2, ...), "
                             f"got {value!r}")
    else:
        number_type = int if isinstance(item.default, int) else (int, float)
        if (not isinstance(value, number_type) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            kind = "an integer" if number_type is int else "a finite number"
            raise ValueError(f"{item.name} must be {kind} >= 0, got {value!r}")


@dataclass(frozen=True)
class KDOptions(MethodOptions):
    """Hinton KD: ``weight * T^2 KL(softmax(zt/T) || softmax(zs/T))`` next to the CE term."""

    temperature: float = option(4.0, "softmax temperature T")
    weight: float = option(1.0, "weight of the KD term", distiller_only=True)


@dataclass(frozen=True)
class DKDOptions(MethodOptions):
    """Decoupled KD (mdistiller's CIFAR-100 settings)."""

    alpha: float = option(1.0, "weight of TCKD, the target/non-target binary KL")
    beta: float = option(8.0, "weight of NCKD, the KL among non-target classes")
    temperature: float = option(4.0, "softmax temperature T")
    warmup_epochs: int = option(20, "epochs over which the DKD term ramps up linearly from 0",
                                distiller_only=True)


@dataclass(frozen=True)
class LDRLDOptions(MethodOptions):
    """LDRLD (shared/spec/ldrld.md; the authors' CIFAR-100 settings)."""

    temperature: float = option(4.0, "softmax temperature T")
    top_d: int = option(7, "d: the student's top-d classes whose pairs are distilled")
    alpha: float = option(10.5, "weight of the local term (pairs + top set)")
    beta: float = option(7.0, "weight of the remaining-classes term")
    ce_weight: float = option(1.0, "weight of the cross-entropy term")
    irw_eps: float = option(1.5, "ADW: eps of the inverse rank weight 1 / (|r - r'| + eps)")
    erd_scale: float = option(2.0, "ADW: scale of the exponential rank decay")
    erd_decay: float = option(0.05, "ADW: rate of the exponential rank decay")


@dataclass(frozen=True)
class HCDOptions(MethodOptions):
    """HCD (shared/spec/hcd.md): per tapped stage w_gt L_sce + w_sdd L_sdd + w_ol L_ol, with
    ``kd_weight * T^2 KL(zt || zs)`` and the CE term beside."""

    num_sub: int = option(4, "n: sub-logits per stage")
    temperature: float = option(1.0, "softmax temperature T (stage KL and the KD term)")
    theta: float = option(0.5, "orthogonality margin: cosines above it are penalised")
    w_gt: float = option(1.0, "weight of the fused logits' cross-entropy L_sce")
    w_sdd: float = option(6.0, "weight of the fused-to-student KL L_sdd")
    w_ol: float = option(1.0, "weight of the orthogonality loss L_ol")
    lam_s: float = option(1.0, "fusion weight of the shared sub-logits")
    lam_t: float = option(1.0, "fusion weight of the teacher's logits")
    detach_target: bool = option(False, "stop the L_sdd gradient on the fused (target) side")
    stages: tuple = option((), "student stages (1-based) to tap; none given: all of them (4 for a "
                           "pyramid or a ViT, 3 for the CIFAR ResNets)", distiller_only=True)
    cfm: str = option("mlp", "complementary feature mapper", distiller_only=True,
                      choices=("mlp", "linear"))
    kd_weight: float = option(1.0, "weight of the KD term on the student's logits",
                              distiller_only=True)


KD = KDOptions()
DKD = DKDOptions()
LDRLD = LDRLDOptions()
HCD = HCDOptions()
