"""What every method's options dataclass is made of: ``MethodOptions`` and ``option``.

Each method declares its dataclass in its registry module (``fastkd.methods.ldrld.LDRLDOptions``
and the default instance ``LDRLD``; a plug-in in its own file): the single source of its settings
and their defaults. The loss functions take their keyword defaults from it
(``ldrld_loss(..., top_d=LDRLD.top_d)``), the loss modules and distillers hold one instance, the
trainer's flags are generated from the fields (``--ldrld-top-d``, ``--hcd-num-sub``, ...) and the
benchmarks run the defaults.

A field marked ``distiller_only`` configures the distiller around the loss (a weight, a warm-up,
which stages to tap) and is not an argument of the loss function. ``help`` is the flag's text and
``choices`` limits a string field.
"""

import dataclasses
import math
from dataclasses import field


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
