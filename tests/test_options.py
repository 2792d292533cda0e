"""One source of each method's defaults (fastkd.methods.<method>) for the functions and the loss modules;
LDRLD without class indices (soft targets, no target); teacher and student logits of different
dtypes."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, random_logits

from fastkd import (
    DKDLoss,
    HCDLogitLoss,
    KDLoss,
    LDRLDLoss,
    dkd_loss,
    hcd_logit_loss,
    kd_loss,
    ldrld_loss,
)
from fastkd.methods.dkd import DKD, DKDOptions
from fastkd.methods.hcd import HCD
from fastkd.methods.kd import KD, KDOptions
from fastkd.methods.ldrld import LDRLD, LDRLDOptions
from fastkd.reference import dkd_loss_reference, kd_loss_reference, ldrld_loss_reference
from fastkd.reference.hcd import hcd_logit_loss_reference

# ---------------------------------------------------------------------------------------------
# Defaults: the functions' keyword defaults are the dataclasses'.

# function -> (its method's default options, its keyword-only parameters in order: the public API)
FUNCTIONS = {
    ldrld_loss: (LDRLD, ["temperature", "top_d", "alpha", "beta", "ce_weight", "irw_eps",
                         "erd_scale", "erd_decay", "reduction", "backend", "return_parts"]),
    kd_loss: (KD, ["temperature", "reduction", "backend"]),
    dkd_loss: (DKD, ["alpha", "beta", "temperature", "reduction", "backend", "return_parts"]),
    hcd_logit_loss: (HCD, ["num_sub", "temperature", "label_smoothing", "theta", "w_gt", "w_sdd",
                           "w_ol", "lam_s", "lam_t", "detach_target", "reduction", "backend",
                           "return_parts"]),
}
REFERENCES = {ldrld_loss_reference: LDRLD, kd_loss_reference: KD, dkd_loss_reference: DKD}
MODULES = {LDRLDLoss: LDRLD, KDLoss: KD, DKDLoss: DKD, HCDLogitLoss: HCD}


def keyword_only(function):
    return {name: parameter for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda function: function.__name__)
def test_function_defaults_are_the_dataclass_defaults(function):
    defaults, keywords = FUNCTIONS[function]
    parameters = keyword_only(function)
    assert list(parameters) == keywords
    for name, value in defaults.loss_options().items():
        assert parameters[name].default == value, name


def test_references_take_every_loss_option():
    """The oracles have no defaults of their own: every caller states each option."""
    for function, defaults in REFERENCES.items():
        parameters = keyword_only(function)
        assert set(defaults.loss_options()) <= set(parameters), function.__name__
        assert all(parameter.default is inspect.Parameter.empty
                   for parameter in parameters.values()), function.__name__
    parameters = keyword_only(hcd_logit_loss_reference)
    assert set(parameters) == {*HCD.loss_options(), "label_smoothing"}


# ---------------------------------------------------------------------------------------------
# Loss modules: one options object.

@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_module_defaults_are_the_dataclass_defaults(module):
    loss = module()
    assert loss.options == MODULES[module]
    assert loss.loss_keywords().items() >= MODULES[module].loss_options().items()


def test_keywords_and_options_object_agree():
    student, teacher, target = random_logits(4, 12, seed=61)
    by_keywords = LDRLDLoss(temperature=2.0, top_d=5, backend="torch")
    by_options = LDRLDLoss(LDRLDOptions(temperature=2.0, top_d=5), backend="torch")
    assert by_keywords.options == by_options.options == LDRLD.replace(temperature=2.0, top_d=5)
    assert repr(by_keywords) == repr(by_options)
    assert "top_d=5" in repr(by_keywords) and "backend='torch'" in repr(by_keywords)
    torch.testing.assert_close(by_keywords(student, teacher, target),
                               by_options(student, teacher, target), rtol=0, atol=0)
    # Keywords change a given options object.
    assert LDRLDLoss(LDRLDOptions(top_d=5), alpha=1.0).options == LDRLD.replace(top_d=5, alpha=1.0)

    torch.testing.assert_close(DKDLoss(DKDOptions(beta=4.0))(student, teacher, target),
                               DKDLoss(beta=4.0)(student, teacher, target), rtol=0, atol=0)
    torch.testing.assert_close(KDLoss(KDOptions(temperature=2.0))(student, teacher),
                               kd_loss(student, teacher, temperature=2.0), rtol=0, atol=0)


def test_module_refuses_unknown_and_distiller_only_options():
    with pytest.raises(TypeError, match=r"LDRLDLoss got unexpected option topd; it takes "
                                        r"temperature, top_d, .*, reduction, backend, return_parts"):
        LDRLDLoss(topd=3)
    with pytest.raises(TypeError, match=r"KDLoss got unexpected option weight \(weight: applied "
                                        r"by the distiller, not the loss\); it takes temperature"):
        KDLoss(weight=2.0)
    with pytest.raises(TypeError, match=r"warmup_epochs: applied by the distiller"):
        DKDLoss(warmup_epochs=5)
    with pytest.raises(TypeError, match=r"cfm, stages: applied by the distiller"):
        HCDLogitLoss(stages=(4,), cfm="linear")
    with pytest.raises(TypeError, match=r"DKDLoss takes a DKDOptions, got LDRLDOptions"):
        DKDLoss(LDRLDOptions())


@pytest.mark.parametrize("build, argument", [
    (lambda: LDRLDLoss(temperature=0), "temperature"),
    (lambda: LDRLDLoss(top_d=0), "top_d"),
    (lambda: LDRLDLoss(top_d=2.5), "top_d"),
    (lambda: LDRLDLoss(alpha=-1.0), "alpha"),
    (lambda: LDRLDLoss(reduction="avg"), "reduction"),
    (lambda: LDRLDLoss(backend="cuda"), "backend"),
    (lambda: KDLoss(temperature=-4.0), "temperature"),
    (lambda: DKDLoss(beta=float("nan")), "beta"),
    (lambda: HCDLogitLoss(num_sub=0), "num_sub"),
    (lambda: HCDLogitLoss(label_smoothing=1.5), "label_smoothing"),
    (lambda: HCDLogitLoss(theta=float("inf")), "theta"),
])
def test_module_refuses_a_bad_setting_when_built(build, argument):
    """Where the functional loss would refuse a setting at each call, the module refuses it at
    construction, with the functional's message, before any batch is seen."""
    with pytest.raises((ValueError, TypeError), match=rf"^{argument}\b"):
        build()


def test_module_checks_settings_without_knowing_the_class_count():
    """top_d (a numpy integer here) may exceed any small dummy class count; the check at
    construction does not refuse what a call with enough classes takes."""
    student, teacher, target = random_logits(3, 40, seed=63)
    loss = LDRLDLoss(top_d=np.int64(32), backend="torch")
    torch.testing.assert_close(loss(student, teacher, target),
                               ldrld_loss(student, teacher, target, top_d=32, backend="torch"),
                               rtol=0, atol=0)


def test_module_compiles_to_one_graph():
    """torch.compile traces the module's options (it cannot trace dataclasses.fields())."""
    student, teacher, target = random_logits(4, 10, seed=68)
    module = LDRLDLoss(top_d=3, backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="eager")  # dynamo alone
    torch.testing.assert_close(compiled(student, teacher, target), module(student, teacher, target))


def test_options_object_applies_its_loss_fields_only():
    """A distiller's options (here a KD weight) are accepted whole; the loss ignores the weight."""
    student, teacher, _ = random_logits(3, 7, seed=62)
    weighted = KDLoss(KD.replace(weight=3.0, temperature=2.0))
    torch.testing.assert_close(weighted(student, teacher),
                               kd_loss(student, teacher, temperature=2.0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# LDRLD without class indices: only the CE term reads labels.

def ldrld_run(student, teacher, target, backend, **options):
    student = student.detach().clone().requires_grad_()
    loss, parts = ldrld_loss(student, teacher, target, top_d=4, ce_weight=0.0, backend=backend,
                             reduction="none", return_parts=True, **options)
    loss.sum().backward()
    return loss.detach(), parts, student.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_ldrld_without_class_indices_equals_integer_labels(backend):
    student, teacher, target = random_logits(3, 30, seed=63)
    expected_loss, expected_parts, expected_grad = ldrld_run(student, teacher, target, backend)
    one_hot = F.one_hot(target, 30).float()
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, dims=0)  # what Mixup hands over
    for labels in (None, one_hot, mixed):
        loss, parts, grad = ldrld_run(student, teacher, labels, backend)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
        assert set(parts) == {"local", "rntk"}
        for name in parts:
            torch.testing.assert_close(parts[name], expected_parts[name], rtol=0, atol=0)


def test_ldrld_module_without_labels():
    student, teacher, target = random_logits(3, 20, seed=64)
    module = LDRLDLoss(ce_weight=0.0, backend="torch")
    torch.testing.assert_close(module(student, teacher, None), module(student, teacher, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ldrld_soft_or_missing_target_needs_ce_weight_zero(backend):
    student, teacher, target = random_logits(3, 10, seed=65)
    message = (r"target must be class indices \[B\] when ce_weight != 0 \(the CE term\), got {}; "
               r"with soft targets \(mixup\) pass ce_weight=0 and add a soft-target CE")
    with pytest.raises(ValueError, match=message.format("None")):
        ldrld_loss(student, teacher, None, backend=backend)
    with pytest.raises(ValueError, match=message.format(r"soft targets of shape \(3, 10\)")):
        ldrld_loss(student, teacher, F.one_hot(target, 10).float(), ce_weight=1.0,
                   backend=backend)


def test_ldrld_soft_target_is_checked():
    student, teacher, _ = random_logits(3, 10, seed=66)
    with pytest.raises(ValueError, match=r"target must have the shape of student_logits \(3, 10\) "
                                         r"for soft targets, got \(3, 9\)"):
        ldrld_loss(student, teacher, torch.zeros(3, 9, device=DEVICE), ce_weight=0.0)
    with pytest.raises(TypeError, match="target must be an integer tensor of class indices"):
        ldrld_loss(student, teacher, torch.zeros(3, device=DEVICE), ce_weight=0.0)


# ---------------------------------------------------------------------------------------------
# Teacher and student logits of different dtypes.

def loss_with_grads(loss, inputs, differentiable, backend):
    """Per-row loss and the gradients of its sum w.r.t. the inputs at ``differentiable``."""
    inputs = [tensor.detach().clone() for tensor in inputs]
    for index in differentiable:
        inputs[index].requires_grad_()
    rows = loss(*inputs, backend=backend, reduction="none")
    rows.sum().backward()
    return rows.detach(), [inputs[index].grad for index in differentiable]


def hcd_inputs(batch, num_classes, seed):
    student, teacher, target = random_logits(batch, num_classes, seed)
    shared = torch.randn(batch, 2 * num_classes, generator=torch.Generator().manual_seed(seed))
    return [shared.to(DEVICE), teacher, student, target]


# loss -> (its inputs for a seed, the indices of the inputs that get gradients). Inputs are
# (student, teacher[, target]), for HCD (shared, teacher, student, target).
LOSSES = {
    "ldrld": (lambda *args, **kw: ldrld_loss(*args, top_d=3, **kw),
              lambda seed: list(random_logits(3, 24, seed)), (0,)),
    "kd": (kd_loss, lambda seed: list(random_logits(3, 24, seed)[:2]), (0,)),
    "dkd": (dkd_loss, lambda seed: list(random_logits(3, 24, seed)), (0,)),
    "hcd": (lambda *args, **kw: hcd_logit_loss(*args, num_sub=2, label_smoothing=0.1, **kw),
            lambda seed: hcd_inputs(3, 24, seed), (0, 2)),
}
# {input index: dtype}, the logits not named staying fp32: index 1 is always the teacher; index 0
# the student (for HCD the shared logits).
DTYPE_CASES = {
    "fp16-teacher": {1: torch.float16},
    "bf16-teacher": {1: torch.bfloat16},
    "bf16-student": {0: torch.bfloat16},
    "fp64-teacher": {1: torch.float64},
}


@pytest.mark.parametrize("case", DTYPE_CASES)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_compute_in_the_wider_dtype(backend, name, case):
    """Mixed logits give the loss of the same logits cast to fp32 (fp64 if any is fp64), and each
    gradient in its input's dtype."""
    loss, make_inputs, differentiable = LOSSES[name]
    inputs = make_inputs(seed=67)
    dtypes = DTYPE_CASES[case]
    mixed = [tensor.to(dtypes[index]) if index in dtypes else tensor
             for index, tensor in enumerate(inputs)]
    compute = torch.float64 if torch.float64 in dtypes.values() else torch.float32
    widened = [tensor.to(compute) if tensor.dtype.is_floating_point else tensor
               for tensor in mixed]
    rows, grads = loss_with_grads(loss, mixed, differentiable, backend)
    expected_rows, expected_grads = loss_with_grads(loss, widened, differentiable, backend)
    assert rows.dtype == compute
    torch.testing.assert_close(rows, expected_rows, rtol=1e-6, atol=1e-6)
    for index, grad, expected in zip(differentiable, grads, expected_grads):
        assert grad.dtype == mixed[index].dtype
        # Rounded once to a bf16 input's dtype (the interpreter truncates: up to 1 ulp, 2^-7).
        tolerance = 1e-2 if grad.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(grad.to(compute), expected, rtol=tolerance, atol=tolerance)
