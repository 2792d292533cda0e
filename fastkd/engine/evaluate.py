"""Accuracy over the validation split, and the closing report."""

import torch
import torch.nn.functional as F


def accuracy_counts(logits, target):
    """``[top-1 correct, top-5 correct]`` as a device tensor (not read: a read is a sync)."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top5 == target.unsqueeze(1)
    return torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])


def evaluate(model, loader, world, autocast, convert_input=None):
    """Top-1 and top-5 accuracy (%) and the mean cross-entropy over the whole validation set, all
    ranks together; read from the device once. ``convert_input`` maps the loader's images to the
    model's normalisation (a teacher's)."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=world.device)
    loss, total = torch.zeros((), dtype=torch.float64, device=world.device), 0
    with torch.no_grad(), torch.autocast(world.device.type, dtype=autocast[1],
                                         enabled=autocast[0]):
        for images, target in loader:
            if convert_input is not None:
                images = convert_input(images)
            logits = model(images)
            correct += accuracy_counts(logits, target)
            loss += F.cross_entropy(logits.float(), target, reduction="sum")
            total += len(target)
    top1, top5, loss, total = world.sum([*correct, loss, total])
    return 100 * top1 / total, 100 * top5 / total, loss / total


def report(args, world, run, rows, seconds):
    """The closing table: teacher and student accuracy, wall time, throughput."""
    lines = [f"{'':<10}{'model':<16}{'top-1':>8}{'top-5':>8}"]
    if run.teacher_accuracy is not None:
        teacher_top1, teacher_top5 = run.teacher_accuracy
        lines.append(f"{'teacher':<10}{args.teacher:<16}{teacher_top1:>8.2f}"
                     f"{teacher_top5:>8.2f}")
    if rows:
        last, best = rows[-1], max(rows, key=lambda row: row["eval_top1"])
        lines.append(f"{'student':<10}{args.model:<16}{last['eval_top1']:>8.2f}"
                     f"{last['eval_top5']:>8.2f}  last epoch ({last['epoch']})")
        lines.append(f"{'':<26}{best['eval_top1']:>8.2f}{best['eval_top5']:>8.2f}  best epoch "
                     f"({best['epoch']})")
        rate = sum(row["img_per_s"] for row in rows) / len(rows)
        lines.append(f"{args.distiller} run: {seconds:.0f} s wall, {rate:.0f} img/s training "
                     f"(all ranks), outputs in {run.run_dir}")
    world.log("\n".join(lines))
