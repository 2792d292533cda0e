"""The fused losses as torch.library ops: registration (opcheck), device dispatch, their autograd
contract, and torch.compile of a training step with no graph break."""

import pytest
import torch
from helpers import DEVICE, random_logits

import fastkd
from fastkd import dkd_loss, hcd_logit_loss, kd_loss, ldrld_loss, ops
from fastkd.methods import fused_ops, methods
from fastkd.methods.base import load
from fastkd.methods.dkd import DKD
from fastkd.methods.hcd import HCD
from fastkd.methods.kd import KD
from fastkd.methods.ldrld import LDRLD


def op_calls(compute_grad, backend, dtype=torch.float32):
    """(op, positional arguments) for each op on small random inputs; the differentiable
    inputs require grad when ``compute_grad``."""
    student, teacher, target = random_logits(3, 10, seed=41, dtype=dtype)
    shared = random_logits(3, 20, seed=42, dtype=dtype)[0]
    student.requires_grad_(compute_grad)
    shared.requires_grad_(compute_grad)
    ldrld = LDRLD
    hcd = HCD
    return {
        "ldrld": (torch.ops.fastkd.ldrld.default,
                  (student, teacher, target, ldrld.temperature, 4, ldrld.alpha, ldrld.beta,
                   ldrld.ce_weight, ldrld.irw_eps, ldrld.erd_scale, ldrld.erd_decay,
                   compute_grad, backend)),
        "ldrld-no-labels": (torch.ops.fastkd.ldrld.default,
                            (student, teacher, None, ldrld.temperature, 2, ldrld.alpha,
                             ldrld.beta, 0.0, ldrld.irw_eps, ldrld.erd_scale, ldrld.erd_decay,
                             compute_grad, backend)),
        "kd": (torch.ops.fastkd.kd.default, (student, teacher, KD.temperature, compute_grad,
                                             backend)),
        "dkd": (torch.ops.fastkd.dkd.default,
                (student, teacher, target, DKD.alpha, DKD.beta, DKD.temperature, compute_grad,
                 backend)),
        "hcd": (torch.ops.fastkd.hcd.default,
                (shared, teacher, student, target, 2, 2.0, 0.1, hcd.theta, hcd.w_gt, hcd.w_sdd,
                 hcd.w_ol, hcd.lam_s, hcd.lam_t, hcd.detach_target, compute_grad, backend)),
    }


OPS = list(op_calls(True, "torch"))


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, backend, compute_grad):
    """Schema, autograd registration, fake (meta) implementation and AOT dispatch with dynamic
    shapes, as torch.library.opcheck tests them; triton runs under the interpreter on CPU."""
    op, args = op_calls(compute_grad, backend)[name]
    torch.library.opcheck(op, args)


def test_opcheck_float64():
    op, args = op_calls(True, "torch", torch.float64)["ldrld"]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", OPS)
def test_op_outputs_and_backward_contract(name):
    """(loss rows, parts, gradients): the gradients are those autograd hands back for the sum of
    the rows; parts and gradients are not differentiable; no gradient is computed without
    compute_grad."""
    op, args = op_calls(True, "torch")[name]
    loss_rows, parts, *gradients = op(*args)
    differentiable = [arg for arg in args if isinstance(arg, torch.Tensor) and arg.requires_grad]
    assert not parts.requires_grad and not any(g.requires_grad for g in gradients)
    expected = [g.clone() for g in gradients]
    autograd_grads = torch.autograd.grad(loss_rows.sum(), differentiable)
    for actual, wanted in zip(autograd_grads, expected):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
    _, args = op_calls(False, "torch")[name]
    _, _, *gradients = op(*args)
    assert all(g.numel() == 0 for g in gradients)


def bytes_allocated_by(function):
    """Bytes the CPU allocator handed out while ``function()`` ran (torch.profiler's memory
    events: allocations only, frees not subtracted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        function()
    return sum(max(event.self_cpu_memory_usage, 0) for event in profiler.events())


@pytest.mark.skipif(DEVICE != "cpu", reason="the CUDA variant is in test_gpu.py")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_function", [ldrld_loss, dkd_loss, kd_loss],
                         ids=["ldrld", "dkd", "kd"])
def test_backward_allocates_no_gradient_sized_block(loss_function, backend):
    """A fused loss's backward hands on the gradient its forward computed, scaled in place: it
    allocates nothing near a gradient's size (autograd materialising zeros for the unused
    gradient outputs did: two gradients' peak in 2026-12-04's H200 check)."""
    student, teacher, target = random_logits(16, 4096, seed=43)
    student.requires_grad_()
    labels = () if loss_function is kd_loss else (target,)
    loss = loss_function(student, teacher, *labels, backend=backend)
    gradient_bytes = student.numel() * student.element_size()
    assert bytes_allocated_by(loss.backward) < gradient_bytes / 4


def test_gradient_asked_of_a_call_without_one_is_an_error():
    op, args = op_calls(False, "torch")["kd"]
    student = args[0].detach().requires_grad_()
    loss_rows, _, _ = op(student, *args[1:])
    with pytest.raises(RuntimeError, match="ran with compute_grad=False and saved no gradient"):
        loss_rows.sum().backward()


def test_unknown_op_backend_is_refused():
    op, args = op_calls(False, "cuda")["kd"]
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        op(*args)


LDRLD_WITHOUT_LABELS = fastkd.LDRLDLoss(top_d=3, ce_weight=0.0)  # a module, built outside the step


def distillation_step(student, shared, teacher, target):
    """Every public loss, summed: what a training step of each distiller computes."""
    return (ldrld_loss(student, teacher, target, top_d=4)
            + kd_loss(student, teacher)
            + dkd_loss(student, teacher, target)
            + hcd_logit_loss(shared, teacher, student, target, num_sub=2, label_smoothing=0.1)
            + LDRLD_WITHOUT_LABELS(student, teacher, None))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CUDA variant is in test_gpu.py")
def test_compiled_step_has_no_graph_break_and_matches_eager():
    """torch.compile(fullgraph=True) fails on any graph break; the compiled step (inductor on
    CPU) gives eager's loss and gradients."""
    student, teacher, target = random_logits(6, 12, seed=43)
    shared = random_logits(6, 24, seed=44)[0]
    results = []
    for step in (distillation_step, torch.compile(distillation_step, fullgraph=True)):
        student_leaf = student.clone().requires_grad_()
        shared_leaf = shared.clone().requires_grad_()
        loss = step(student_leaf, shared_leaf, teacher, target)
        loss.backward()
        results.append((loss.detach(), student_leaf.grad, shared_leaf.grad))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_dynamic_shape_compile_traces_every_loss_in_one_graph():
    """torch.compile(dynamic=True), as bench/'s "compiled" provider runs the losses, traces
    Python floats as symbols: the option checks must stay traceable (math.isfinite on one was a
    graph break, and each call site recompiled: minutes per loss on the 2026-12-04 H200). One
    graph (fullgraph), and a second batch size reuses it (no recompile). Dynamo alone (the eager
    backend): inductor's code is test_compiled_step_has_no_graph_break_and_matches_eager's."""
    torch._dynamo.reset()
    step = torch.compile(distillation_step, dynamic=True, fullgraph=True, backend="eager")
    for batch in (6, 9):
        student, teacher, target = random_logits(batch, 12, seed=45)
        shared = random_logits(batch, 24, seed=46)[0]
        with torch._dynamo.config.patch(error_on_recompile=batch == 9):
            compiled = step(student, shared, teacher, target)
        torch.testing.assert_close(compiled, distillation_step(student, shared, teacher, target))


def test_the_ops_are_called_by_argument_name():
    """``ops.call`` takes every argument by name and orders it by the op's schema: a missing or
    unknown name is an error naming it, a default (``backend``) is filled."""
    student, teacher = torch.zeros(2, 3), torch.ones(2, 3)
    rows, _, _ = ops.call("kd", teacher_logits=teacher, temperature=2.0, compute_grad=False,
                          student_logits=student)
    torch.testing.assert_close(rows, kd_loss(student, teacher, temperature=2.0,
                                             reduction="none"))
    with pytest.raises(TypeError, match="fastkd::kd has no argument temprature"):
        ops.call("kd", student_logits=student, teacher_logits=teacher, temprature=2.0,
                 compute_grad=False)
    with pytest.raises(TypeError, match="needs the argument temperature"):
        ops.call("kd", student_logits=student, teacher_logits=teacher, compute_grad=False)


def test_each_method_record_names_the_code_that_runs():
    """A built-in method's record (``fastkd.methods.<method>``) is what the ops are registered
    from: its public loss is fastkd's, its op's torch, Triton and reference implementations
    import, and the registered op's schema, differentiable inputs and part names are the
    record's."""
    described = {name: method for name, method in methods().items() if method.op is not None}
    assert set(described) == set(fused_ops()) == {"kd", "dkd", "ldrld", "hcd"}
    for name, method in described.items():
        fused = method.op
        assert load(method.loss) is getattr(fastkd, method.loss.split(":")[1])
        assert all(callable(load(path)) for path in (fused.vectorized, fused.kernel,
                                                     fused.reference))
        schema = str(getattr(torch.ops.fastkd, fused.name).default._schema)
        assert schema == f"fastkd::{fused.schema}".replace("'", '"'), name
        returned = schema.split("-> (")[1]
        assert returned.count("Tensor") == 2 + len(fused.gradients)
        columns = torch.zeros(2, len(fused.parts))
        assert list(ops.named_parts(fused.name, columns)) == list(fused.parts)
