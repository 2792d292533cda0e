"""nn.Module wrappers of the public losses, for dropping into any training loop."""

from torch import nn

from . import functional


class _ConfiguredLoss(nn.Module):
    """Holds a loss's keyword options and shows them in the module's repr."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class LDRLDLoss(_ConfiguredLoss):
    """``LDRLDLoss(**options)(student_logits, teacher_logits, target)``; options as
    :func:`fastkd.functional.ldrld_loss`."""

    def __init__(self, *, temperature=4.0, top_d=7, alpha=10.5, beta=7.0, ce_weight=1.0,
                 irw_eps=1.5, erd_scale=2.0, erd_decay=0.05, reduction="mean", backend="auto",
                 return_parts=False):
        super().__init__(
            temperature=temperature, top_d=top_d, alpha=alpha, beta=beta, ce_weight=ce_weight,
            irw_eps=irw_eps, erd_scale=erd_scale, erd_decay=erd_decay, reduction=reduction,
            backend=backend, return_parts=return_parts,
        )

    def forward(self, student_logits, teacher_logits, target):
        return functional.ldrld_loss(student_logits, teacher_logits, target, **self.options)


class KDLoss(_ConfiguredLoss):
    """``KDLoss(temperature=4.0)(student_logits, teacher_logits)``: Hinton KD."""

    def __init__(self, *, temperature=4.0, reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

    def forward(self, student_logits, teacher_logits):
        return functional.kd_loss(student_logits, teacher_logits, **self.options)


class DKDLoss(_ConfiguredLoss):
    """``DKDLoss(alpha=1.0, beta=8.0)(student_logits, teacher_logits, target)``: Decoupled KD."""

    def __init__(self, *, alpha=1.0, beta=8.0, temperature=4.0, reduction="mean", backend="auto",
                 return_parts=False):
        super().__init__(alpha=alpha, beta=beta, temperature=temperature, reduction=reduction,
                         backend=backend, return_parts=return_parts)

    def forward(self, student_logits, teacher_logits, target):
        return functional.dkd_loss(student_logits, teacher_logits, target, **self.options)
