"""nn.Module wrappers of the public losses, for dropping into any training loop.

Each module holds one options object (``self.options``, the method's dataclass from
``fastkd.methods.<method>``) and the call's other settings (``self.settings``: reduction,
backend, ...).
Build it from keywords, ``LDRLDLoss(top_d=5)``, or from options,
``LDRLDLoss(LDRLDOptions(top_d=5))`` (keywords then change the given options). The module applies
the options' loss fields (``options.loss_options()``); the distiller-only fields (a term's
weight, a warm-up, the stages to tap) belong to the distillers, so as keywords they are refused.
"""

import torch
from torch import Tensor, nn

from . import functional, validation
from .methods.dkd import DKD, DKDOptions
from .methods.hcd import HCD, HCDOptions
from .methods.kd import KD, KDOptions
from .methods.ldrld import LDRLD, LDRLDOptions

# The loss, or with ``return_parts`` the loss and its named parts.
LossResult = Tensor | tuple[Tensor, dict[str, Tensor]]


class _MethodLoss(nn.Module):
    """``options`` (default: the method's defaults, ``defaults``) with the keyword ``overrides``
    applied, and the generic ``settings``; shown in the module's repr."""

    defaults = None  # the method's default options, set by each subclass

    def __init__(self, options, overrides, **settings):
        super().__init__()
        name = type(self).__name__
        options = self.defaults if options is None else options
        if not isinstance(options, type(self.defaults)):
            raise TypeError(f"{name} takes a {type(self.defaults).__name__}, got "
                            f"{type(options).__name__}")
        loss_fields = options.loss_options()
        refused = sorted(set(overrides) - set(loss_fields))
        if refused:
            fields = {item.name for item in options.fields()}
            distiller_only = [option for option in refused if option in fields]
            note = (f" ({', '.join(distiller_only)}: applied by the distiller, not the loss)"
                    if distiller_only else "")
            raise TypeError(f"{name} got unexpected option {', '.join(refused)}{note}; it takes "
                            f"{', '.join([*loss_fields, *settings])}")
        self.options = options.replace(**overrides)
        self.settings = settings
        # Named once here: torch.compile cannot trace the dataclasses.fields() call behind
        # options.loss_options().
        self.loss_fields = tuple(loss_fields)
        # Refused now rather than at the first call (``check``).
        functional.requested_backend(settings["backend"])
        self.check(self.options, self.check_classes(self.options), **settings)

    @classmethod
    def check(cls, options, num_classes, **settings):
        """Raise the ``TypeError`` or ``ValueError`` (its message starting with the argument's
        name) that the functional loss gives ``options`` and ``settings`` on logits of
        ``num_classes`` classes, before any work: one call on a dummy batch (zero logits,
        class-0 labels) on the torch backend. The rules stay in one place, the functional
        loss's checks; the distillers check their options through this too."""
        logits, target = torch.zeros(2, num_classes), torch.zeros(2, dtype=torch.long)
        cls.dummy_call(options, logits, target,
                       **{**options.loss_options(), **settings, "backend": "torch"})

    @staticmethod
    def check_classes(options):
        """The dummy batch's class count at construction, where the data's is not known: one
        any valid setting takes."""
        return 2

    @staticmethod
    def dummy_call(options, logits, target, **keywords):
        """The functional loss on the dummy batch ``logits``, ``target``."""
        raise NotImplementedError

    def loss_keywords(self):
        """The keyword arguments of the loss function."""
        options = {name: getattr(self.options, name) for name in self.loss_fields}
        return {**options, **self.settings}

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.loss_keywords().items())


class LDRLDLoss(_MethodLoss):
    """``LDRLDLoss(options=None, *, reduction="mean", backend="auto", return_parts=False,
    **LDRLDOptions fields)(student_logits, teacher_logits, target)``: LDRLD as
    :func:`fastkd.functional.ldrld_loss` computes it."""

    defaults = LDRLD

    def __init__(self, options: LDRLDOptions | None = None, *, reduction: str = "mean",
                 backend: str = "auto", return_parts: bool = False, **overrides):
        super().__init__(options, overrides, reduction=reduction, backend=backend,
                         return_parts=return_parts)

    @staticmethod
    def check_classes(options):
        # As many classes as top_d asks for (a call with fewer is refused, rightly, then).
        return max(validation.check_count("top_d", options.top_d), 2)

    @staticmethod
    def dummy_call(options, logits, target, **keywords):
        functional.ldrld_loss(logits, logits, target, **keywords)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                target: Tensor | None) -> LossResult:
        return functional.ldrld_loss(student_logits, teacher_logits, target,
                                     **self.loss_keywords())


class KDLoss(_MethodLoss):
    """``KDLoss(options=None, *, reduction="mean", backend="auto", temperature=...)(student_logits,
    teacher_logits)``: Hinton KD as :func:`fastkd.functional.kd_loss`. The options' ``weight`` is
    the KD distiller's, not applied here."""

    defaults = KD

    def __init__(self, options: KDOptions | None = None, *, reduction: str = "mean",
                 backend: str = "auto", **overrides):
        super().__init__(options, overrides, reduction=reduction, backend=backend)

    @staticmethod
    def dummy_call(options, logits, target, **keywords):
        functional.kd_loss(logits, logits, **keywords)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return functional.kd_loss(student_logits, teacher_logits, **self.loss_keywords())


class DKDLoss(_MethodLoss):
    """``DKDLoss(options=None, *, reduction="mean", backend="auto", return_parts=False,
    alpha=..., beta=..., temperature=...)(student_logits, teacher_logits, target)``: Decoupled KD
    as :func:`fastkd.functional.dkd_loss`. The warm-up (``warmup_epochs``) is the DKD
    distiller's, not applied here."""

    defaults = DKD

    def __init__(self, options: DKDOptions | None = None, *, reduction: str = "mean",
                 backend: str = "auto", return_parts: bool = False, **overrides):
        super().__init__(options, overrides, reduction=reduction, backend=backend,
                         return_parts=return_parts)

    @staticmethod
    def dummy_call(options, logits, target, **keywords):
        functional.dkd_loss(logits, logits, target, **keywords)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                target: Tensor) -> LossResult:
        return functional.dkd_loss(student_logits, teacher_logits, target,
                                   **self.loss_keywords())


class HCDLogitLoss(_MethodLoss):
    """``HCDLogitLoss(options=None, *, label_smoothing=0.0, reduction="mean", backend="auto",
    return_parts=False, **HCDOptions loss fields)(shared_logits, teacher_logits, student_logits,
    target)``: one stage of HCD's sub-logit loss as :func:`fastkd.functional.hcd_logit_loss`.
    ``stages``, ``cfm`` and ``kd_weight`` are the HCD distiller's, not applied here."""

    defaults = HCD

    def __init__(self, options: HCDOptions | None = None, *, label_smoothing: float = 0.0,
                 reduction: str = "mean", backend: str = "auto", return_parts: bool = False,
                 **overrides):
        super().__init__(options, overrides, label_smoothing=label_smoothing,
                         reduction=reduction, backend=backend, return_parts=return_parts)

    @staticmethod
    def dummy_call(options, logits, target, **keywords):
        num_sub = validation.check_count("num_sub", options.num_sub)
        shared = logits.new_zeros(len(logits), num_sub * logits.shape[1])
        functional.hcd_logit_loss(shared, logits, logits, target, **keywords)

    def forward(self, shared_logits: Tensor, teacher_logits: Tensor, student_logits: Tensor,
                target: Tensor) -> LossResult:
        return functional.hcd_logit_loss(shared_logits, teacher_logits, student_logits, target,
                                         **self.loss_keywords())
