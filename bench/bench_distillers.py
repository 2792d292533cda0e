"""Training-step time of each distiller against CE alone, on the same models: ``pytest bench/``.

One SGD step (forward of student and frozen teacher, loss, backward, update) at batch 64 on
32x32 inputs with the demo run's models (student resnet20, teacher wrn_16_2; HCD on the
student's three stages). The difference to CE is what distillation costs per step: the teacher's
forward pass plus the loss (and HCD's projectors and mappers).
"""

import pytest
import timm
import torch

from fastkd.distillers import build_distiller, methods

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Each method's default options, but that HCD taps resnet20's three stages.
OVERRIDES = {"hcd": {"stages": (1, 2, 3)}}


@pytest.mark.parametrize("name", list(methods()))
def bench_distiller_step(benchmark, name):
    torch.manual_seed(0)
    student = timm.create_model("resnet20", num_classes=10)
    teacher = (timm.create_model("wrn_16_2", num_classes=10) if methods()[name].needs_teacher
               else None)
    distiller = build_distiller(name, student, teacher, **OVERRIDES.get(name, {})).to(
        DEVICE).train()
    optimizer = torch.optim.SGD(distiller.get_trainable_module().parameters(), lr=0.01)
    images = torch.randn(64, 3, 32, 32, device=DEVICE)
    target = torch.randint(0, 10, (64,), device=DEVICE)
    benchmark.group = f"training step, resnet20 <- wrn_16_2, batch 64, 32x32, {DEVICE}"

    def step():
        loss = distiller(images, target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    benchmark(step)
