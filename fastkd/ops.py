"""The fused losses as torch ops: ``torch.ops.fastkd.ldrld``, ``.kd``, ``.dkd`` and ``.hcd``.

Each op returns ``(loss_rows [B], parts [B, K], *gradients)``: the per-row loss, its parts and,
in the same call, the gradient of each row's loss w.r.t. each differentiable input (empty
tensors when ``compute_grad`` is false). Its autograd kernel (``FusedRows``) only scales those
saved gradient rows by the upstream gradient of ``loss_rows``, so a fused loss holds one
gradient of memory and no autograd graph of its own; ``parts`` and the gradients are not
differentiable.

The op dispatches by device: ``backend="auto"`` runs the Triton kernel (``fastkd.kernels``) on
CUDA tensors where triton imports (HCD only where it was measured faster), and the vectorised
torch code (``fastkd.vectorized``) elsewhere, the CPU kernel; ``"torch"`` and ``"triton"`` force
one (``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``). Fake implementations give
torch.compile the outputs' shapes, so a compiled step holds each loss as one opaque op, with no
graph break, and a CUDA graph captures its kernel.

Registered with the low-level ``torch.library.Library`` API rather than ``custom_op`` /
``triton_op``: their Python wrappers (argument re-filling, alias checks, dynamo-disable guards)
cost about 110 us more per forward + backward call than this registration on the development
VM (2-core EPYC, tiny CPU tensors: 522-534 us against 412-440 us, 398-418 us for a bare
autograd.Function), and host time is what the fused losses spend at classification shapes.
Arguments are assumed validated (``fastkd.functional`` validates before calling).
"""

import functools
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .ldrld_weights import ldrld_group_weights
from .methods import fused_ops
from .methods.base import load
from .optional import importable
from .precision import compute_dtype

OP_BACKENDS = ("auto", "torch", "triton")
# ``auto`` runs HCD's kernel only on rows that fit one tile: wider rows are streamed, and there the
# torch backend took 2-5x less GPU time (H200, B = 1024, C = 21843: bench/results/h200-2026-11-26).
HCD_TRITON_AUTO_MAX_CLASSES = 1024


def runs_triton(backend, logits, triton_is_faster=True):
    """Whether an op call with this ``backend`` runs the Triton kernel: always for "triton" (an
    error if it cannot run here); for "auto" on CUDA tensors when triton imports and
    ``triton_is_faster`` (the measured choice for the shape); never for "torch"."""
    if backend == "auto":
        return logits.is_cuda and triton_is_faster and importable("triton")
    if backend == "triton":
        if not importable("triton"):
            raise ValueError("backend='triton' needs the triton package, which does not import")
        if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter), got logits on {logits.device}")
        return True
    if backend != "torch":
        raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
    return False


# Each op's description (``fastkd.methods.<method>``): its arguments, parts and implementations.
OPS = fused_ops()


@functools.cache
def _forward(name, runs_kernel):
    """Op ``name``'s Triton forward (``runs_kernel``) or its vectorised torch forward, imported on
    first use: TRITON_INTERPRET is read when a kernel module is imported."""
    return load(OPS[name].kernel if runs_kernel else OPS[name].vectorized)


def _gradient_or_empty(gradient, like):
    # An op returns tensors only: "no gradient" is an empty one.
    return like.new_empty(0) if gradient is None else gradient


# --- Implementations: one for every device, dispatching on the tensors' device. Keyword-only:
# each op's arguments (its ``FusedOp``) bind the dispatcher's positional arguments to these
# names. ---

def ldrld(*, student_logits, teacher_logits, target, temperature, top_d, alpha, beta, ce_weight,
          irw_eps, erd_scale, erd_decay, compute_grad, backend):
    forward = _forward("ldrld", runs_triton(backend, student_logits))
    top_set_weight, num_groups = ldrld_group_weights(top_d, irw_eps, erd_scale, erd_decay)
    loss, parts, (grad,) = forward(
        student_logits, teacher_logits, target, temperature=temperature, top_d=top_d,
        alpha=alpha, beta=beta, ce_weight=ce_weight, irw_eps=irw_eps, erd_scale=erd_scale,
        erd_decay=erd_decay, top_set_weight=top_set_weight, num_groups=num_groups,
        needs_grad=(compute_grad,))
    return loss, parts, _gradient_or_empty(grad, student_logits)


def kd(*, student_logits, teacher_logits, temperature, compute_grad, backend):
    forward = _forward("kd", runs_triton(backend, student_logits))
    loss, parts, (grad,) = forward(student_logits, teacher_logits, None, temperature=temperature,
                                   needs_grad=(compute_grad,))
    return loss, parts, _gradient_or_empty(grad, student_logits)


def dkd(*, student_logits, teacher_logits, target, alpha, beta, temperature, compute_grad,
        backend):
    forward = _forward("dkd", runs_triton(backend, student_logits))
    loss, parts, (grad,) = forward(student_logits, teacher_logits, target, alpha=alpha, beta=beta,
                                   temperature=temperature, needs_grad=(compute_grad,))
    return loss, parts, _gradient_or_empty(grad, student_logits)


def hcd(*, shared_logits, teacher_logits, student_logits, target, num_sub, temperature,
        label_smoothing, theta, w_gt, w_sdd, w_ol, lam_s, lam_t, detach_target, compute_grad,
        backend):
    fits_one_tile = student_logits.shape[1] <= HCD_TRITON_AUTO_MAX_CLASSES
    forward = _forward("hcd", runs_triton(backend, student_logits, fits_one_tile))
    loss, parts, (grad_shared, _, grad_student) = forward(
        shared_logits, teacher_logits, student_logits, target, num_sub=num_sub,
        temperature=temperature, label_smoothing=label_smoothing, theta=theta, w_gt=w_gt,
        w_sdd=w_sdd, w_ol=w_ol, lam_s=lam_s, lam_t=lam_t, detach_target=detach_target,
        needs_grad=(compute_grad, False, compute_grad))
    return (loss, parts, _gradient_or_empty(grad_shared, shared_logits),
            _gradient_or_empty(grad_student, student_logits))


# The device dispatch of each op in ``OPS``, by name.
IMPLEMENTATIONS = {"ldrld": ldrld, "kd": kd, "dkd": dkd, "hcd": hcd}
if IMPLEMENTATIONS.keys() != OPS.keys():
    raise ImportError(f"fastkd.ops: the fused ops {sorted(OPS)} need a device dispatch each, "
                      f"found {sorted(IMPLEMENTATIONS)}")


def _bound(schema, args, kwargs):
    """The op's arguments by name, from a call in ``schema`` order ((argument, default) pairs),
    defaults filled (the dispatcher may leave them out)."""
    values = dict(zip((argument for argument, _ in schema), args), **kwargs)
    for argument, default in schema[len(args):]:
        values.setdefault(argument, default)
    return values


def _fake_outputs(fused, schema, args, kwargs):
    """What the op that ``fused`` describes returns, shapes and dtypes only (torch.compile
    traces with this): loss and parts rows in the compute dtype of its logits, and a contiguous
    gradient shaped like each differentiable input (empty without ``compute_grad``)."""
    values = _bound(schema, args, kwargs)
    like = values[fused.logits[0]]
    loss = like.new_empty(like.shape[0], dtype=compute_dtype(*(values[n] for n in fused.logits)))
    parts = like.new_empty(like.shape[0], len(fused.parts), dtype=loss.dtype)
    gradients = tuple(values[n].new_empty(values[n].shape if values["compute_grad"] else 0)
                      for n in fused.gradients)
    return (loss, parts, *gradients)


# --- Autograd: backward scales the gradient rows that the forward saved. ---

def graph_is_kept():
    """Whether this backward pass keeps the graph (retain_graph / create_graph, gradcheck): the
    saved gradients are then needed again and must not be modified. Where torch's (private)
    query is missing or cannot be traced (torch.compile), assume they are."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return query is None or torch.compiler.is_compiling() or query()


def _scale_rows(gradient, grad_loss_rows):
    """``gradient`` [B, ...] with each row times that row's upstream gradient: right for any
    reduction and any per-sample weighting. The loss rows are fp32 (fp64 for fp64 inputs), so
    the product is formed at that precision and rounded once (1/B does not round to bf16 before
    it scales the gradient)."""
    if gradient.numel() == 0 and grad_loss_rows.numel() != 0:
        raise RuntimeError("this fastkd op ran with compute_grad=False and saved no gradient")
    scale = grad_loss_rows.unsqueeze(1)
    if type(gradient) is torch.Tensor and not graph_is_kept():
        # Eager, and the graph is freed after this pass: scale the saved gradient in place and
        # hand it on, so the loss costs no memory beyond one gradient. (Traced tensors, under
        # torch.compile or opcheck, are scaled out of place.)
        return gradient.mul_(scale)
    return (gradient * scale).to(gradient.dtype)


class FusedRows(torch.autograd.Function):
    """The autograd kernel of every fastkd op: ``FusedRows.apply(op, gradient_inputs, *args)``
    runs ``op`` (the op below autograd, or its implementation: ``call``) on ``args``; its
    outputs past (loss_rows, parts) are the gradients of the inputs at positions
    ``gradient_inputs``, which backward scales row by row. Every other input (teacher, labels,
    options) gets None."""

    @staticmethod
    def forward(ctx, op, gradient_inputs, *args):
        with torch._C._AutoDispatchBelowAutograd():
            outputs = op(*args)
        _, parts, *gradients = outputs
        ctx.gradient_inputs = gradient_inputs
        ctx.save_for_backward(*gradients)
        ctx.mark_non_differentiable(parts, *gradients)
        # Otherwise autograd hands backward a zero-filled tensor for each output it does not
        # differentiate: a second gradient's worth of memory (the H200 check of 2026-12-04).
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss_rows, *unused):
        input_grads = [None] * len(ctx.needs_input_grad)
        if grad_loss_rows is None:  # the loss rows took no part in what is differentiated
            return tuple(input_grads)
        for position, gradient in zip(ctx.gradient_inputs, ctx.saved_tensors):
            position += 2  # past op and gradient_inputs
            if ctx.needs_input_grad[position]:
                input_grads[position] = _scale_rows(gradient, grad_loss_rows)
        return tuple(input_grads)


# --- Registration. ---

_LIBRARY = torch.library.Library("fastkd", "DEF")
# name -> (the op, its implementation, positions of its differentiable inputs, its schema's
# (argument, default) pairs and their names: read once, since reading the schema costs host time
# and torch.compile cannot trace it)
_REGISTERED = {}


def _register(fused):
    """Define ``fastkd::<name>`` as ``fused`` (a ``FusedOp``) describes it: one implementation
    for every device (its device dispatch), its fake and its autograd kernel."""
    _LIBRARY.define(fused.schema)
    op = getattr(torch.ops.fastkd, fused.name).default
    arguments = _schema_arguments(op)
    names = tuple(argument for argument, _ in arguments)
    gradient_inputs = tuple(names.index(name) for name in fused.gradients)

    dispatch = IMPLEMENTATIONS[fused.name]

    def implementation(*args, **kwargs):
        return dispatch(**_bound(arguments, args, kwargs))

    def fake(*args, **kwargs):
        return _fake_outputs(fused, arguments, args, kwargs)

    def autograd_kernel(*args):
        return FusedRows.apply(op, gradient_inputs, *args)

    _LIBRARY.impl(fused.name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastkd::{fused.name}", fake, lib=_LIBRARY)
    _LIBRARY.impl(fused.name, autograd_kernel, "Autograd")
    _REGISTERED[fused.name] = (op, implementation, gradient_inputs, arguments, frozenset(names))


def implementation(op):
    """The Python implementation behind a ``torch.ops.fastkd`` op (``op.default`` or its
    packet)."""
    return _REGISTERED[op.__name__.split(".")[0]][1]


def _dispatcher_needed(args):
    """Whether something must see the op itself rather than its implementation's work:
    torch.compile's tracing, a Python dispatch mode (FakeTensorMode, a TorchDispatchMode),
    functorch transforms (vmap, grad) or a tensor subclass."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()
            or any(type(arg) is not torch.Tensor for arg in args if isinstance(arg, torch.Tensor)))


_MISSING = object()


def _schema_arguments(op):
    """``((name, default or _MISSING), ...)`` of ``op``'s schema."""
    return tuple((argument.name, argument.default_value if argument.has_default_value()
                  else _MISSING) for argument in op._schema.arguments)


def positional(name, schema, names, arguments):
    """``arguments`` ({name: value}) in the order of op ``name``'s ``schema`` ((argument,
    default) pairs; ``names``: theirs), its defaults filled: the schema is the one list of an
    op's arguments, and the callers name each one (a swapped argument cannot pass silently). A
    missing or unknown name is a TypeError naming it."""
    if not arguments.keys() <= names:
        unknown = sorted(set(arguments) - names)
        raise TypeError(f"fastkd::{name} has no argument {', '.join(unknown)}")
    values = tuple(arguments.get(argument, default) for argument, default in schema)
    if any(value is _MISSING for value in values):
        missing = [argument for (argument, _), value in zip(schema, values) if value is _MISSING]
        raise TypeError(f"fastkd::{name} needs the argument {', '.join(missing)}")
    return values


def call(name, **arguments):
    """``torch.ops.fastkd.<name>(**arguments)``, what the public losses run. In a plain eager
    call it applies the op's autograd kernel (``FusedRows``) to its implementation directly,
    which is where the dispatcher would arrive: the same work, without the op call's schema
    parsing and call back into Python, about 40-65 us per forward + backward on the
    development VM (tiny CPU tensors: KD 445 -> 406 us, HCD 1034 -> 968 us)."""
    op, function, gradient_inputs, schema, names = _REGISTERED[name]
    args = positional(name, schema, names, arguments)
    if _dispatcher_needed(args):
        return op(*args)
    return FusedRows.apply(function, gradient_inputs, *args)


for _fused in OPS.values():
    _register(_fused)


def named_parts(name, part_columns):
    """Op ``name``'s ``parts`` output ``[B, K]`` as ``{part name: [B]}``."""
    return dict(zip(OPS[name].parts, part_columns.unbind(dim=1)))
