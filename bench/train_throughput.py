"""Training throughput of each distiller and its loss's share of the step, on synthetic images.

``python bench/train_throughput.py --output OUTDIR`` (CUDA): for CE, KD, DKD, LDRLD and HCD, a
timm ResNet-18 student (ResNet-34 teacher) at 224x224, channels-last, bf16 autocast, SGD, on one
fixed random batch (no data loading): ``--warmup`` steps, then ``--steps`` timed with CUDA events.

The loss's share is ``(step - step without the loss) / step``, where the step without the loss
runs the same forward passes (the teacher's too, when the distiller has one) with a stand-in
loss (the mean of the student logits): what the loss adds, HCD's projectors and mappers
included. That stand-in step is timed before and after the distillers, and the spread of the two
is the noise of a share.
"""

import argparse
import json
import os

import timm
import torch

from fastkd.distillers import Distiller, build_distiller, methods

DISTILLERS = tuple(methods())  # each with its options' defaults


class StandInLoss(Distiller):
    """The forward passes a distiller makes, with the mean of the student logits as its loss."""

    def compute(self, images, target, epoch):
        if self.teacher is not None:
            self.teacher_logits(images)
        student_logits = self.trainable_module(images)
        return self.result(student_logits, stand_in=student_logits.float().mean())


def step_milliseconds(distiller, images, target, steps, warmup):
    """Mean time of one SGD step over ``steps`` timed steps, after ``warmup`` untimed ones."""
    distiller = distiller.cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(distiller.get_trainable_module().parameters(), lr=0.01,
                                momentum=0.9)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = distiller(images, target)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def models(args):
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=1000)
    teacher = timm.create_model(args.teacher, num_classes=1000)
    return student, teacher


def markdown(result):
    lines = [f"{result['student']} <- {result['teacher']}, batch {result['batch_size']}, "
             f"{result['image_size']}x{result['image_size']}, bf16 autocast, channels-last, "
             f"{result['steps']} steps, {result['gpu']}, torch {result['torch']}", "",
             "| distiller | img/s | step | step without the loss | loss share |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['distiller']} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {row['distiller']} | {row['images_per_s']:.0f} | "
                     f"{row['step_ms']:.2f} ms | {row['stand_in_ms']:.2f} ms | "
                     f"{100 * row['loss_share']:.2f}% |")
    lines += ["", "Stand-in step timed before and after (noise of a share): " + ", ".join(
        f"{name}: {before:.2f} / {after:.2f} ms"
        for name, (before, after) in result["stand_in_ms"].items())]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for throughput.json and .md")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--distillers", nargs="+", choices=DISTILLERS, default=DISTILLERS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch_size,), device="cuda")

    def time_stand_in(with_teacher):
        student, teacher = models(args)
        distiller = StandInLoss(student, teacher if with_teacher else None)
        return step_milliseconds(distiller, images, target, args.steps, args.warmup)

    stand_in_before = {"without teacher": time_stand_in(False), "with teacher": time_stand_in(True)}
    rows = []
    for name in args.distillers:
        student, teacher = models(args)
        try:
            needs_teacher = methods()[name].needs_teacher
            distiller = build_distiller(name, student, teacher if needs_teacher else None)
            step = step_milliseconds(distiller, images, target, args.steps, args.warmup)
        except Exception as error:  # recorded in the results; the other distillers still run
            rows.append({"distiller": name, "error": repr(error)})
            print(rows[-1], flush=True)
            continue
        stand_in = stand_in_before["with teacher" if needs_teacher else "without teacher"]
        rows.append({"distiller": name, "step_ms": step, "stand_in_ms": stand_in,
                     "images_per_s": args.batch_size / step * 1e3,
                     "loss_share": (step - stand_in) / step})
        print(rows[-1], flush=True)
    stand_in_after = {"without teacher": time_stand_in(False), "with teacher": time_stand_in(True)}
    result = {**vars(args), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rows": rows, "stand_in_ms": {name: (stand_in_before[name], stand_in_after[name])
                                            for name in stand_in_before}}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "throughput.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    text = markdown(result)
    with open(os.path.join(args.output, "throughput.md"), "w") as handle:
        handle.write(text + "\n")
    print(text)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
