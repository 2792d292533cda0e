"""Where a fused loss's extra gradient-sized allocation comes from (the GPU tests of 2026-12-04:
LDRLD and DKD at 1024 x 21843 peaked at two gradients, not one). Prints each allocation of at
least half a gradient during one forward + backward, with its Python frames, and whether the
student's .grad is the gradient the op computed (autograd's AccumulateGrad steals a tensor that
nothing else references, and clones one that something does)."""

import sys

import torch

import fastkd.ops as ops
from fastkd import dkd_loss, ldrld_loss

returned = []
scale_rows = ops._scale_rows


def recording_scale_rows(gradient, grad_loss_rows):
    kept = ops.graph_is_kept()
    result = scale_rows(gradient, grad_loss_rows)
    returned.append((result.data_ptr(), gradient.data_ptr(), kept, sys.getrefcount(gradient)))
    return result


ops._scale_rows = recording_scale_rows
for loss in (ldrld_loss, dkd_loss):
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator("cuda").manual_seed(5)
        student = torch.randn(1024, 21843, device="cuda", generator=generator).to(dtype)
        teacher = torch.randn(1024, 21843, device="cuda", generator=generator).to(dtype)
        target = torch.randint(0, 21843, (1024,), device="cuda", generator=generator)
        student.requires_grad_()
        gradient_bytes = student.numel() * student.element_size()
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss(student, teacher, target, backend="triton").backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        print(f"\n== {loss.__name__} {dtype}: peak extra {extra / gradient_bytes:.2f} "
              f"gradients; "
              f"returned (result ptr, saved ptr, graph kept, refcount) {returned[-1]}; "
              f".grad is the op's gradient: {student.grad.data_ptr() == returned[-1][0]}")
        for trace in snapshot["device_traces"]:
            for event in trace:
                if event["action"] == "alloc" and event["size"] >= gradient_bytes // 2:
                    frames = [f"{frame['filename'].split('/')[-1]}:{frame['line']}:{frame['name']}"
                              for frame in event["frames"] if frame["filename"].endswith(".py")]
                    print(f"alloc {event['size'] / gradient_bytes:.2f} gradients:",
                          " <- ".join(frames[:8]))
        del student, teacher, target
