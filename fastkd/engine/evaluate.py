"""Accuracy over the validation split, and the closing report."""

import torch
import torch.nn.functional as F


def accuracy_counts(logits, target):
    """``[top-1 correct, top-5 correct]`` as a device tensor (not read: a read is a sync)."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top5 == target.unsqueeze(1)
    return torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()])


def evaluate(model, loader, world, autocast, convert_input=None, poll=None):
    """Top-1 and top-5 accuracy (%) and the mean cross-entropy over the whole validation set, all
    ranks together; read from the device once, under ``autocast`` (an ``optim.Autocast``).
    ``convert_input`` maps the loader's images to the model's normalisation (a teacher's).
    ``poll()`` is called before each batch that every rank has (shards may differ by one batch),
    where a stop signal may end the evaluation."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=world.device)
    loss, total = torch.zeros((), dtype=torch.float64, device=world.device), 0
    common = int(world.min([len(loader)])[0]) if poll else 0
    with torch.no_grad(), autocast(world.device.type):
        for number, (images, target) in enumerate(loader):
            if number < common:
                poll()
            if convert_input is not None:
                images = convert_input(images)
            logits = model(images)
            correct += accuracy_counts(logits, target)
            loss += F.cross_entropy(logits.float(), target, reduction="sum")
            total += len(target)
    top1, top5, loss, total = world.sum([*correct, loss, total])
    return 100 * top1 / total, 100 * top5 / total, loss / total


def verdict(last_gain, best_gain):
    """The closing line's words for the distilled student's top-1 gains over the CE baseline at
    the last and best epochs (a mixed result is said as one: "+0.28 last, +0.00 best" is not a
    plain "does not beat")."""
    if last_gain > 0 and best_gain > 0:
        return "beats the CE baseline"
    if last_gain > 0:
        return "beats the CE baseline at the last epoch, not at the best"
    if best_gain > 0:
        return "beats the CE baseline at the best epoch, not at the last"
    return "does not beat the CE baseline"


def report(args, world, run, baseline, seconds):
    """The closing table: the teacher's accuracy, the student's at its last and best epochs
    and, for the demo, the CE-only baseline student's and the student's gain over it."""
    lines = [f"{'':<10}{'model':<24}{'top-1':>8}{'top-5':>8}"]
    if run.teacher_accuracy is not None:
        teacher_top1, teacher_top5 = run.teacher_accuracy
        lines.append(f"{'teacher':<10}{args.teacher:<24}{teacher_top1:>8.2f}"
                     f"{teacher_top5:>8.2f}")
    students = [("baseline", baseline), ("student", run)] if baseline else [("student", run)]
    for role, student in students:
        if student.rows:
            last, best = last_and_best(student.rows)
            name = f"{student.args.model} ({student.args.distiller})"
            lines.append(f"{role:<10}{name:<24}{last['eval_top1']:>8.2f}"
                         f"{last['eval_top5']:>8.2f}  last epoch ({last['epoch']})")
            lines.append(f"{'':<34}{best['eval_top1']:>8.2f}{best['eval_top5']:>8.2f}  best "
                         f"epoch ({best['epoch']})")
    if baseline and baseline.rows and run.rows:
        gains = [distilled["eval_top1"] - plain["eval_top1"] for distilled, plain
                 in zip(last_and_best(run.rows), last_and_best(baseline.rows))]
        lines.append(f"{args.distiller} - ce top-1: {gains[0]:+.2f} last, {gains[1]:+.2f} best: "
                     f"on this data {args.distiller} {verdict(*gains)}")
    if run.rows:
        rate = sum(row["img_per_s"] for row in run.rows) / len(run.rows)
        # The wall time counts the job: a demo's teacher and baseline too.
        extra = " (with the demo's teacher and CE baseline)" if baseline else ""
        lines.append(f"{args.distiller} run: {seconds:.0f} s wall{extra}, {rate:.0f} img/s "
                     f"training (all ranks), outputs in {run.run_dir}")
    for line in lines:  # one log record each: every row under the same timestamp width
        world.log(line)


def last_and_best(rows):
    """summary.csv's rows of the last epoch and of the best top-1."""
    return rows[-1], max(rows, key=lambda row: row["eval_top1"])
