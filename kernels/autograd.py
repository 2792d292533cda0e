"""The autograd Function behind every fused loss: the forward launch computes each row's loss and
its gradients, backward only scales them. Imports only torch, so the vectorised backends can use it
without triton."""

import torch


class RowLossFunction(torch.autograd.Function):
    """Autograd wrapper for a row-loss launcher that computes gradients in its forward pass.

    ``launcher(*inputs, needs_grad=flags)``, with ``flags[i]`` true when ``inputs[i]`` needs a
    gradient, returns ``(loss_rows [B], parts [B, K], grads)``: ``grads[i]`` is the gradient of
    each row's loss w.r.t. ``inputs[i]`` (rows first, or None), for the leading inputs only.
    Backward scales each gradient row by that row's upstream gradient, which is right for any
    reduction and any non-unit or per-sample weighting. Inputs past ``grads`` (teacher, labels,
    options) never get a gradient.
    """

    @staticmethod
    def forward(ctx, launcher, *inputs):
        loss_rows, parts, grads = launcher(*inputs, needs_grad=ctx.needs_input_grad[1:])
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(parts)
        return loss_rows, parts

    @staticmethod
    def backward(ctx, grad_loss_rows, grad_parts):
        # The loss rows are fp32 (fp64 for fp64 inputs): the product is formed at that precision
        # and rounded once, so 1/B does not round to bf16 before it scales the gradient.
        scale = grad_loss_rows.unsqueeze(1)
        if graph_is_kept():
            grads = tuple(None if grad is None else (grad * scale).to(grad.dtype)
                          for grad in ctx.saved_tensors)
        else:
            # The graph is freed after this pass: scale the saved gradients in place and hand
            # them on, so the loss costs no memory beyond one gradient.
            grads = tuple(None if grad is None else grad.mul_(scale) for grad in ctx.saved_tensors)
        return (None, *grads) + (None,) * (ctx.num_inputs - len(grads))


def graph_is_kept():
    """Whether this backward pass keeps the graph (retain_graph / create_graph, gradcheck): the
    saved gradients are then needed again and must not be modified. Where torch's (private)
    query is missing or cannot be traced (torch.compile), assume they are."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return query is None or torch.compiler.is_compiling() or query()
