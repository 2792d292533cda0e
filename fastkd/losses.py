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


class HCDLogitLoss(_ConfiguredLoss):
    """``HCDLogitLoss(num_sub=4)(shared_logits, teacher_logits, student_logits, target)``: one
    stage of HCD's sub-logit loss; options as :func:`fastkd.functional.hcd_logit_loss`."""

    def __init__(self, *, num_sub=4, temperature=1.0, label_smoothing=0.0, theta=0.5, w_gt=1.0,
                 w_sdd=6.0, w_ol=1.0, lam_s=1.0, lam_t=1.0, detach_target=False,
                 reduction="mean", backend="auto", return_parts=False):
        super().__init__(
            num_sub=num_sub, temperature=temperature, label_smoothing=label_smoothing,
            theta=theta, w_gt=w_gt, w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t,
            detach_target=detach_target, reduction=reduction, backend=backend,
            return_parts=return_parts,
        )

    def forward(self, shared_logits, teacher_logits, student_logits, target):
        return functional.hcd_logit_loss(shared_logits, teacher_logits, student_logits, target,
                                         **self.options)
