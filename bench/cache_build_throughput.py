"""The teacher cache builder's throughput against its teacher's eval-mode forward pass alone.

    python bench/cache_build_throughput.py --teacher-checkpoint TEACHER/best.pth [--workers 0 1 2]

(a) ``forward``: the teacher (wrn_16_2, 100 classes, the glyphs default, with the checkpoint's
weights) in eval mode without gradients, fp32, on one random batch of the builder's shape
(``--batch-size`` x 3 x 32 x 32): img/s of the median of ``--repeats`` passes of ``--batches``
batches each. Measured before and after the builds: the two are the forward's drift.

(b) ``build``: ``train/cache_teacher.py --epochs 1 --loader torch --cache-dtype float16`` on the
glyphs (the default data) into a fresh folder, ``--runs`` times per ``--workers`` value: wall
time of the whole command, then of the same command on the finished cache, which sets everything
up (imports, data check, loaders, teacher and its weights) and stops with "nothing to do". The
difference is the build itself (reading and augmenting the images, the forward passes, writing
the shards), over which its img/s is counted; tqdm's last (smoothed) rate is shown beside it.
Each ratio is a build's img/s over (a)'s first figure.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch

import fastkd  # noqa: F401  (registers the CIFAR nets in timm)
from fastkd.engine import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER, CLASSES, SIZE = "wrn_16_2", 100, 32


def forward_rate(args):
    """img/s of the teacher's eval forward pass, median of ``args.repeats`` passes."""
    teacher = timm.create_model(TEACHER, num_classes=CLASSES)
    checkpoint.load_weights(teacher, args.teacher_checkpoint, arch=TEACHER)
    teacher.eval()
    images = torch.randn(args.batch_size, 3, SIZE, SIZE)
    seconds = []
    with torch.no_grad():
        for _ in range(3):
            teacher(images)
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.batches):
                teacher(images)
            seconds.append(time.perf_counter() - start)
    return args.batches * args.batch_size / statistics.median(seconds)


def timed(command):
    """(wall seconds, output) of ``command``, which must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return seconds, done.stdout + done.stderr


def build(args, workers):
    """(samples, build seconds, setup seconds, tqdm's last img/s) of one build."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "train/cache_teacher.py", "--teacher-cache",
                   os.path.join(folder, "cache"), "--teacher-checkpoint", args.teacher_checkpoint,
                   "--epochs", "1", "--loader", "torch", "--workers", str(workers),
                   "--batch-size", str(args.batch_size), "--cache-dtype", "float16"]
        whole, output = timed(command)
        setup, again = timed(command)
    assert "nothing to do" in again, again
    samples = int(re.search(r"1 views x (\d+) samples", output).group(1))
    rates = re.findall(r"([\d.]+)img/s", output)
    return samples, whole - setup, setup, float(rates[-1]) if rates else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-checkpoint", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=24, help="batches per forward pass")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{TEACHER}, batch {args.batch_size}, {SIZE}x{SIZE}, fp32")
    forward = forward_rate(args)
    print(f"forward: {forward:.0f} img/s")
    for workers in args.workers:
        for run in range(args.runs):
            samples, seconds, setup, tqdm_rate = build(args, workers)
            rate = samples / seconds
            print(f"build --workers {workers} run {run + 1}: {samples} images in {seconds:.2f} s "
                  f"(+ {setup:.2f} s setup), {rate:.0f} img/s (tqdm {tqdm_rate:.0f}), "
                  f"{rate / forward:.2f} x forward")
    print(f"forward again: {forward_rate(args):.0f} img/s")


if __name__ == "__main__":
    main()
