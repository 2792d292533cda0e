"""A one-minute tour of the losses on CPU: ``python -m fastkd.demo``.

Trains a teacher MLP on a synthetic 20-class problem, then distils a small student from it with
plain cross-entropy, KD, DKD and LDRLD, and prints each student's validation accuracy, its final
loss parts and how the backends agree on one batch. The classes overlap, so the teacher sits
near the best accuracy the data allows and distillation is not expected to beat plain
cross-entropy here: this shows the API and the cost of each loss, not their merit. (The full
trainer, ``train/main.py``, replaces this as the main job once it lands.)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import dkd_loss, kd_loss, ldrld_loss

NUM_CLASSES = 20
FEATURES = 32


def make_data(num_samples, generator):
    """Gaussian clusters whose class means overlap enough that the classes are not separable."""
    means = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 0.45
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    points = means[labels] + torch.randn(num_samples, FEATURES, generator=generator)
    return points, labels


def mlp(hidden):
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))


def accuracy(model, points, labels):
    with torch.no_grad():
        return (model(points).argmax(1) == labels).float().mean().item()


def train(model, points, labels, loss_fn, epochs, batch_size=128, lr=0.05):
    """SGD over shuffled mini-batches; returns the last batch's loss parts."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    parts = {}
    for _ in range(epochs):
        order = torch.randperm(len(points), generator=generator)
        for start in range(0, len(points), batch_size):
            batch = order[start:start + batch_size]
            loss, parts = loss_fn(model(points[batch]), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--samples", type=int, default=12000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(42)
    train_x, train_y = make_data(args.samples, generator)
    val_x, val_y = make_data(2000, generator)

    teacher = mlp(512)
    train(teacher, train_x, train_y, lambda out, idx: (F.cross_entropy(out, train_y[idx]), {}),
          args.epochs)
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(train_x)
    print(f"teacher (MLP 512): val top-1 {accuracy(teacher, val_x, val_y):.3f}")

    def ce(out, idx):
        return F.cross_entropy(out, train_y[idx]), {}

    def kd(out, idx):
        return F.cross_entropy(out, train_y[idx]) + kd_loss(out, teacher_logits[idx]), {}

    def dkd(out, idx):
        loss, parts = dkd_loss(out, teacher_logits[idx], train_y[idx], return_parts=True)
        return F.cross_entropy(out, train_y[idx]) + loss, parts

    def ldrld(out, idx):
        return ldrld_loss(out, teacher_logits[idx], train_y[idx], return_parts=True)

    print(f"{'student (MLP 16)':<18}{'val top-1':>10}{'seconds':>10}  last-batch parts")
    for name, loss_fn in (("CE", ce), ("KD", kd), ("DKD", dkd), ("LDRLD", ldrld)):
        torch.manual_seed(0)
        student = mlp(16)
        start = time.perf_counter()
        parts = train(student, train_x, train_y, loss_fn, args.epochs)
        seconds = time.perf_counter() - start
        shown = " ".join(f"{key}={value.item():.3f}" for key, value in parts.items())
        print(f"{name:<18}{accuracy(student, val_x, val_y):>10.3f}{seconds:>10.1f}  {shown}")

    student_logits = mlp(16)(val_x[:256])
    for backend in ("reference", "torch"):
        value = ldrld_loss(student_logits, teacher(val_x[:256]), val_y[:256], backend=backend)
        print(f"LDRLD on one batch, backend={backend}: {value.item():.6f}")


if __name__ == "__main__":
    main()
