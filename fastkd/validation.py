"""Argument checks shared by the public losses. Each error names the argument and what was expected.

Checks that would force a device sync (label range on CUDA tensors) run only when the environment
variable ``FASTKD_VALIDATE=1`` is set; on CPU tensors they always run. Without them an out-of-range
label on CUDA gives a NaN loss from the fused kernels rather than an error.
"""

import math
import numbers
import os

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_float_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def check_logits(student_logits, teacher_logits):
    """Both ``[B, C]`` floating tensors of one shape and device, with B >= 1 and C >= 2. Their
    dtypes may differ (a teacher run under autocast next to an fp32 student): the losses compute
    in ``precision.compute_dtype`` of both."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_float_tensor(name, logits)
        if logits.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D [batch, classes], got shape {tuple(logits.shape)}"
            )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits must be on the device of student_logits ({student_logits.device}), "
            f"got {teacher_logits.device}"
        )
    batch, num_classes = student_logits.shape
    if batch < 1 or num_classes < 2:
        raise ValueError(
            "student_logits must have at least 1 row and 2 classes, "
            f"got shape {(batch, num_classes)}"
        )


def reads_values(tensor):
    """Whether checks may read ``tensor``'s values on the host: always for CPU tensors (free),
    on other devices only with ``FASTKD_VALIDATE=1`` (on CUDA a read is a device sync), and
    never under torch.compile (a graph break)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or os.environ.get("FASTKD_VALIDATE") == "1"


def check_target(target, student_logits):
    """Integer class indices ``[B]`` in ``0..C-1`` on the logits' device."""
    batch, num_classes = student_logits.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a torch.Tensor of class indices, got {type(target).__name__}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if target.shape != (batch,):
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    if target.device != student_logits.device:
        raise ValueError(
            f"target must be on the device of student_logits ({student_logits.device}), "
            f"got {target.device}"
        )
    if reads_values(target):
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"target must hold class indices in 0..{num_classes - 1}, found {bad}")


def check_ldrld_target(target, student_logits, ce_weight):
    """LDRLD's ``target``: class indices ``[B]`` (as ``check_target``), or, when ``ce_weight`` is
    0, None or soft targets ``[B, C]`` (mixup's), since only the CE term reads labels. Returns
    the class indices, or None where there are none."""
    is_soft = (isinstance(target, torch.Tensor) and target.dtype.is_floating_point
               and target.dim() == 2)
    if target is not None and not is_soft:
        check_target(target, student_logits)
        return target
    if ce_weight != 0:
        given = "None" if target is None else f"soft targets of shape {tuple(target.shape)}"
        raise ValueError(
            f"target must be class indices [B] when ce_weight != 0 (the CE term), got {given}; "
            "with soft targets (mixup) pass ce_weight=0 and add a soft-target CE"
        )
    if is_soft:
        if target.shape != student_logits.shape:
            raise ValueError(
                "target must have the shape of student_logits "
                f"{tuple(student_logits.shape)} for soft targets, got {tuple(target.shape)}"
            )
        if target.device != student_logits.device:
            raise ValueError(
                f"target must be on the device of student_logits ({student_logits.device}), "
                f"got {target.device}"
            )
    return None


def check_shared_logits(shared_logits, student_logits, num_sub):
    """HCD's shared logits ``[B, num_sub * C]``, floating, on the student logits' device.
    Returns ``num_sub`` as an int."""
    num_sub = check_count("num_sub", num_sub)
    check_float_tensor("shared_logits", shared_logits)
    batch, num_classes = student_logits.shape
    if shared_logits.dim() != 2 or shared_logits.shape[0] != batch:
        raise ValueError(
            f"shared_logits must be 2-D [{batch}, num_sub * classes], "
            f"got shape {tuple(shared_logits.shape)}"
        )
    width = shared_logits.shape[1]
    if width != num_sub * num_classes:
        if width % num_classes == 0:
            holds = f"{width} = {width // num_classes} sub-logits of {num_classes} classes"
        else:
            holds = f"{width}, not a multiple of {num_classes} classes"
        raise ValueError(
            f"shared_logits must have num_sub * classes = {num_sub} * {num_classes} = "
            f"{num_sub * num_classes} columns, got {holds}"
        )
    if shared_logits.device != student_logits.device:
        raise ValueError(
            f"shared_logits must be on the device of student_logits ({student_logits.device}), "
            f"got {shared_logits.device}"
        )
    return num_sub


def _number(name, value, expected, integral=False):
    """``value`` as a Python float (int where ``integral``): any real (integral) number, numpy's
    scalars included, bool not. The fused ops take Python numbers only."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind):
        # Say what was given when its value looks right (a tensor(4.), a "4").
        given = "" if isinstance(value, numbers.Number) or value is None else (
            f" (a {type(value).__name__}: give a Python or numpy number)")
        raise ValueError(f"{name} must be {expected}, got {value!r}{given}")
    return int(value) if integral else float(value)


def check_probability(name, value):
    """``value`` as a float in [0, 1)."""
    number = _number(name, value, "a number in [0, 1)")
    if not 0 <= number < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return number


def _is_finite(number):
    """math.isfinite by comparison: torch.compile(dynamic=True) traces Python floats as symbols,
    and math.isfinite on one is a graph break (the compiled losses recompiled at every call
    site and took minutes on an H200, 2026-12-04); a comparison is a guard. NaN compares
    false."""
    return -math.inf < number < math.inf


def check_positive(name, value):
    """``value`` as a finite float > 0."""
    number = _number(name, value, "a positive number")
    if not (number > 0 and _is_finite(number)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return number


def check_finite(**values):
    """Each value (a margin) as a finite float, in the order given: NaN or inf makes every loss
    NaN."""
    return _check_numbers(values, "a finite number", lambda number: True)


def check_non_negative(**values):
    """Each value (a weight, a decay, an epsilon) as a finite float >= 0, in the order given: a
    negative weight trains away from the teacher, a negative decay or epsilon makes the rank
    weights grow or divide by zero."""
    return _check_numbers(values, "a finite number >= 0", lambda number: number >= 0)


def _check_numbers(values, expected, admits):
    checked = []
    for name, value in values.items():
        number = _number(name, value, expected)
        if not (_is_finite(number) and admits(number)):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        checked.append(number)
    return checked


def check_flag(name, value):
    """``value`` as a bool (numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_count(name, value):
    """``value`` as a positive int (numpy's integers included)."""
    number = _number(name, value, "a positive integer", integral=True)
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def check_top_d(top_d, num_classes):
    """``top_d`` as an int in 1..num_classes."""
    expected = f"an integer in 1..{num_classes} (the classes)"
    number = _number("top_d", top_d, expected, integral=True)
    if not 1 <= number <= num_classes:
        raise ValueError(f"top_d must be {expected}, got {top_d!r}")
    return number


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
