"""The distributed training loop: ``python train/main.py`` or ``torchrun ... train/main.py``.

One process per device (DDP over NCCL on CUDA, gloo on CPU); rank 0 logs and writes. Each run
folder holds ``args.yaml``, ``summary.csv``, ``last.pth``, ``best.pth`` (student weights + the
full training state, the summary's rows included) and ``curves.png``; files are written
atomically. SIGTERM/SIGINT save ``last.pth`` and exit with 128 + the signal's number; a
non-finite loss stops the run, keeping the last good checkpoint.
"""

import logging
import math
import os
import random
import signal
import sys
import time

import numpy as np
import timm
import torch

from .. import models  # noqa: F401  (registers the CIFAR nets in timm)
from ..data import create_loaders
from ..data.bad_images import BadImageError
from ..data.bad_images import logger as data_logger
from ..distillers import build_distiller
from . import checkpoint, demo_teacher
from .config import parse_args
from .distributed import World
from .run_folder import (
    BEST,
    LAST,
    checkpoint_to_resume,
    create_run_folder,
    plot_curves,
    write_args,
    write_bad_images,
    write_summary,
)


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_settings(args, world):
    """(enabled, dtype) for torch.autocast; CPUs without bf16 instructions run fp32."""
    if not args.amp:
        return False, None
    if world.device.type == "cpu":
        if not cpu_has_bf16():
            world.log("warning: --amp ignored: this CPU has no bf16 instructions, where "
                      "autocast is 14-43x slower than fp32; running fp32")
            return False, None
        return True, torch.bfloat16
    return True, getattr(torch, args.amp_dtype)


def lr_factor(args, epoch):
    """Linear warm-up, then the step or cosine schedule, per epoch."""
    if epoch < args.warmup_epochs:
        return (epoch + 1) / args.warmup_epochs
    if args.sched == "cosine":
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return args.decay_rate ** sum(epoch >= milestone for milestone in args.decay_epochs)


def distiller_options(args, num_classes):
    smoothing = dict(label_smoothing=args.smoothing)
    return {
        "ce": smoothing,
        "kd": dict(temperature=args.kd_temperature, kd_weight=args.kd_weight, **smoothing),
        "dkd": dict(alpha=args.dkd_alpha, beta=args.dkd_beta, temperature=args.kd_temperature,
                    warmup_epochs=args.dkd_warmup_epochs, **smoothing),
        "ldrld": dict(temperature=args.kd_temperature, top_d=args.ldrld_top_d,
                      alpha=args.ldrld_alpha, beta=args.ldrld_beta, **smoothing),
        "hcd": dict(num_classes=num_classes, stages=tuple(args.hcd_stages),
                    num_sub=args.hcd_num_sub, cfm=args.hcd_cfm,
                    temperature=args.hcd_temperature, kd_weight=args.kd_weight, **smoothing),
    }[args.distiller]


def accuracy_counts(logits, target):
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top5 == target.unsqueeze(1)
    return [correct[:, 0].sum().item(), correct.any(dim=1).sum().item(), len(target)]


def evaluate(model, loader, world, autocast):
    """Top-1 and top-5 accuracy (%) over the whole validation set, all ranks together."""
    model.eval()
    counts = [0.0, 0.0, 0.0]
    with torch.no_grad(), torch.autocast(world.device.type, dtype=autocast[1],
                                         enabled=autocast[0]):
        for images, target in loader:
            counts = [a + b for a, b in zip(counts, accuracy_counts(model(images), target))]
    top1, top5, total = world.sum(counts)
    return 100 * top1 / total, 100 * top5 / total


class Stop(Exception):
    """A signal asked the run to stop after saving."""

    def __init__(self, number):
        super().__init__(number)
        self.number = number


def rng_state():
    """This process's random generators, for an exact resume."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """A student (and teacher) under training: model, optimiser, schedule, history. ``run_dir``
    is set by ``open_run`` once the run is known to start."""

    def __init__(self, args, world, loaders, teacher_checkpoint=None):
        self.args, self.world, self.run_dir = args, world, None
        self.train_loader, self.val_loader = loaders
        num_classes = args.num_classes  # resolved from the data by run_job
        student = timm.create_model(args.model, num_classes=num_classes)
        teacher = None
        if args.distiller != "ce":
            teacher = timm.create_model(args.teacher, num_classes=num_classes,
                                        pretrained=args.teacher_pretrained)
            if teacher_checkpoint:
                teacher.load_state_dict(checkpoint.student_state_dict(teacher_checkpoint))
        self.distiller = build_distiller(args.distiller, student, teacher,
                                         **distiller_options(args, num_classes))
        self.distiller.to(world.device)
        if args.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.model = self.distiller
        if args.torchcompile:
            self.distiller.student = torch.compile(student)
        if world.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[world.local_rank] if world.device.type == "cuda"
                else None)
        self.student = student  # the uncompiled module: what checkpoints hold
        parameters = [*student.parameters(), *self.distiller.extra_parameters()]
        if args.opt == "sgd":
            self.optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum,
                                             weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(parameters, lr=args.lr,
                                               weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: lr_factor(args, epoch))
        self.autocast = autocast_settings(args, world)
        self.scaler = torch.amp.GradScaler(
            enabled=self.autocast[0] and self.autocast[1] == torch.float16)
        self.start_epoch, self.best_top1, self.stop_signal = 0, -1.0, 0
        self.rows = []  # summary.csv's rows, one per finished epoch
        self.bad_images = {}  # {path: reason}: image files skipped so far, found by any rank

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch, rng):
        extras = {name: module.state_dict() for name, module in self.distiller.named_children()
                  if name not in ("student", "teacher")}
        return {"model": self.student.state_dict(), "extra": extras,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "best_top1": self.best_top1, "args": vars(self.args),
                "summary": self.rows, "bad_images": self.bad_images, "rng": rng}

    def resume(self, state, path):
        """Continue from ``state``, the checkpoint at ``path`` (already checked against this
        run's settings)."""
        self.student.load_state_dict(state["model"])
        for name, module_state in state["extra"].items():
            getattr(self.distiller, name).load_state_dict(module_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_top1 = state["epoch"], state["best_top1"]
        # The checkpoint's rows, not summary.csv: a crash between the two writes at an epoch's
        # end would otherwise repeat or lose that epoch's row.
        self.rows, self.bad_images = state["summary"], state["bad_images"]
        if len(state["rng"]) == self.world.world_size:  # each rank's own stream of augmentations
            set_rng_state(state["rng"][self.world.rank])
        else:
            self.world.log(f"warning: {path} was saved by {len(state['rng'])} processes and "
                           f"this run has {self.world.world_size}: random augmentations continue "
                           "from this run's seeds, not from where they were")
        self.world.log(f"resumed {path} at epoch {self.start_epoch}")

    def save(self, epoch, top1=None):
        """last.pth (resumes at ``epoch``), and best.pth when ``top1`` is a new best. Every rank
        calls it: the checkpoint holds each rank's random generators."""
        rng = self.world.gather(rng_state())
        if not self.world.main:
            return
        state = self.state(epoch, rng)
        checkpoint.save_atomic(state, os.path.join(self.run_dir, LAST))
        if top1 is not None and top1 >= self.best_top1:
            checkpoint.save_atomic(state, os.path.join(self.run_dir, BEST))

    def saved_checkpoint(self):
        """Where a stopped run can resume from, in words."""
        path = os.path.join(self.run_dir, LAST)
        if os.path.isfile(path):
            return f"the last good checkpoint is {path} (resumes at epoch {len(self.rows)})"
        return "no checkpoint was saved before it"

    def share_bad_images(self):
        """Every rank learns the image files any rank found bad, and skips them from now on;
        rank 0 logs those found elsewhere (other ranks' data warnings are off) and lists them
        all in bad_images.txt. Returns how many there are."""
        loaders = (self.train_loader, self.val_loader)
        own = {path: reason for loader in loaders for path, reason in loader.bad_images.items()}
        for found in self.world.gather(own):
            self.bad_images.update(found)
        for loader in loaders:
            loader.exclude(self.bad_images)
        if self.world.main and self.bad_images:
            for path in sorted(self.bad_images.keys() - own.keys()):
                data_logger.warning("skipping bad image %s: %s", path, self.bad_images[path])
            write_bad_images(self.run_dir, self.bad_images)
        return len(self.bad_images)

    # -- loop -----------------------------------------------------------------------------------
    def _on_signal(self, number, frame):
        self.stop_signal = number

    def train_epoch(self, epoch):
        args, world = self.args, self.world
        self.train_loader.set_epoch(epoch)
        self.model.train()
        totals, seen, started = {}, 0, time.perf_counter()
        # Shards differ by at most one sample, which can give one rank one more (partial) batch:
        # every rank takes the same number of steps, or DDP would wait for the missing one.
        steps = int(world.min([len(self.train_loader)])[0])
        show = world.main and sys.stderr.isatty()
        for step, (images, target) in zip(range(steps), self.train_loader):
            with torch.autocast(world.device.type, dtype=self.autocast[1],
                                enabled=self.autocast[0]):
                _, losses = self.model(images, target, epoch=epoch + step / steps)
            loss = sum(losses.values())
            # One small all-reduce lets every rank agree to stop together (a NaN or a signal on
            # one rank would otherwise leave the others waiting in the next collective).
            non_finite, stop_signal = world.max([float(not torch.isfinite(loss).item()),
                                                 float(self.stop_signal)])
            if non_finite:
                values = {name: value.detach().item() for name, value in losses.items()}
                raise SystemExit(f"error: non-finite loss at epoch {epoch} step {step} "
                                 f"({values}); {self.saved_checkpoint()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for name, value in {"loss": loss, **losses}.items():
                totals[name] = totals.get(name, 0.0) + value.detach().item() * len(target)
            seen += len(target)
            if show or (world.main and (step + 1) % args.log_interval == 0):
                rate = seen * world.world_size / (time.perf_counter() - started)
                end = "\r" if show else "\n"
                print(f"epoch {epoch} [{step + 1}/{steps}] loss {loss.detach().item():.4f} "
                      f"{rate:.0f} img/s", end=end, file=sys.stderr, flush=True)
            if stop_signal:
                raise Stop(int(stop_signal))
        if show:
            print(file=sys.stderr)
        names = sorted(totals)
        sums = world.sum([totals[name] for name in names] + [seen])
        elapsed = time.perf_counter() - started
        return ({name: value / sums[-1] for name, value in zip(names, sums)},
                sums[-1] / elapsed, elapsed)

    def fit(self):
        """Train to ``args.epochs``; returns summary.csv's rows. SIGTERM and SIGINT stop it at the
        next step, saved (their handlers are this run's until it returns)."""
        handlers = {number: signal.signal(number, self._on_signal)
                    for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._fit()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)

    def _fit(self):
        args, world = self.args, self.world
        self.share_bad_images()  # those found before the first step
        for epoch in range(self.start_epoch, args.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            try:
                train_metrics, images_per_second, elapsed = self.train_epoch(epoch)
            except Stop as stop:
                self.save(epoch)
                world.log(f"{signal.Signals(stop.number).name}: saved "
                          f"{os.path.join(self.run_dir, LAST)} (resumes at epoch {epoch}); "
                          "exiting")
                world.barrier()  # every rank exits once rank 0 has saved
                # What a shell reports for a process killed by the signal: a scheduler must
                # not mistake a stopped job for a finished one.
                raise SystemExit(128 + stop.number)
            self.scheduler.step()
            top1, top5 = evaluate(self.model, self.val_loader, world, self.autocast)
            self.rows.append({
                "epoch": epoch, "lr": lr,
                **{f"train_{name}": value for name, value in train_metrics.items()},
                "eval_top1": top1, "eval_top5": top5, "img_per_s": images_per_second,
                "epoch_time": elapsed, "bad_images": self.share_bad_images()})
            self.best_top1 = max(self.best_top1, top1)
            self.save(epoch + 1, top1)
            if world.main:
                write_summary(self.run_dir, self.rows)
                plot_curves(self.run_dir, self.rows)
            world.log(f"epoch {epoch}: loss {train_metrics['loss']:.4f} top-1 {top1:.2f} "
                      f"top-5 {top5:.2f} ({images_per_second:.0f} img/s)")
        return self.rows


def resume_point(args, world):
    """``(path, state)`` of the checkpoint this run continues from, checked against the run's
    settings, or ``(None, None)`` for a fresh run."""
    path = world.broadcast(checkpoint_to_resume(args) if world.main else None)
    if not path:
        return None, None
    state = checkpoint.load(path)
    checkpoint.check_resumable(state["args"], args)
    return path, state


def open_run(args, world, loaders, resume, teacher_checkpoint=None):
    """The run (models, optimiser, resumed from ``resume_point``'s ``resume``), then, once it is
    known to start, its folder and args.yaml: a failed start writes nothing. An evaluation
    writes nothing either."""
    resume_from, state = resume
    run = Run(args, world, loaders, teacher_checkpoint)
    if state:
        run.resume(state, resume_from)
    if args.eval_only:
        return run
    run.run_dir = world.broadcast(create_run_folder(args, resume_from) if world.main else None)
    args.experiment = os.path.basename(run.run_dir)  # as taken, suffix included
    if world.main:
        write_args(run.run_dir, args)
    world.log(f"run folder: {run.run_dir}")
    return run


def train_demo_teacher(args, world, loaders):
    """The demo's teacher checkpoint: trained once with CE and reused while its completion
    record matches; an interrupted teacher resumes from its ``last.pth``."""
    teacher_args = demo_teacher.teacher_args(args)
    finished = world.broadcast(demo_teacher.finished(teacher_args) if world.main else None)
    if finished:
        world.log(f"using the cached demo teacher {finished}")
        return finished
    world.log(f"training the demo teacher {teacher_args.model} first "
              f"({teacher_args.epochs} epochs, CE)")
    run = open_run(teacher_args, world, loaders, resume_point(teacher_args, world))
    run.fit()
    if world.main:
        demo_teacher.mark_finished(teacher_args, run.run_dir)
    world.barrier()
    return os.path.join(run.run_dir, BEST)


def run_job(args, world):
    torch.manual_seed(args.seed + world.rank)
    np.random.seed(args.seed + world.rank)
    random.seed(args.seed + world.rank)
    if not world.main:
        # Bad-image warnings come from rank 0 alone: share_bad_images relays other ranks' finds.
        data_logger.setLevel(logging.ERROR)
        # Rank 0 first writes what the others then read: the demo JPEGs, the verification cache.
        world.barrier()
    try:
        loaders = create_loaders(
            args.dataset, args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
            loader=args.loader, rank=world.rank, world_size=world.world_size,
            device=world.device, workers=args.workers, channels_last=args.channels_last,
            seed=args.seed, bad_images=args.bad_images)
    finally:
        if world.main:
            world.barrier()
    args.num_classes = args.num_classes or loaders[0].num_classes
    started = time.perf_counter()
    resume = resume_point(args, world)  # refused settings cost no demo teacher
    teacher_checkpoint = args.teacher_checkpoint
    if (args.distiller != "ce" and args.dataset == "demo" and not teacher_checkpoint
            and not args.teacher_pretrained):
        teacher_checkpoint = train_demo_teacher(args, world, loaders)
    run = open_run(args, world, loaders, resume, teacher_checkpoint)
    if args.eval_only:
        top1, top5 = evaluate(run.model, loaders[1], world, run.autocast)
        world.log(f"student {args.model}: top-1 {top1:.2f} top-5 {top5:.2f}")
        return
    rows = run.fit()
    report(args, world, run, rows, loaders, time.perf_counter() - started)


def main(argv=None):
    args = parse_args(argv)
    world = World()
    try:
        run_job(args, world)
        status = 0
    except SystemExit as stop:  # the run's own stops: a signal, a non-finite loss, bad settings
        status = stop.code
    except BadImageError as error:  # with --bad-images error: at start, or met while reading
        status = f"error: --bad-images error: {error}"
    # Only now are run_job's frames, and the DDP modules that hold the process group, gone.
    world.close()
    sys.exit(status)


def report(args, world, run, rows, loaders, seconds):
    """The closing table: teacher and student accuracy, wall time, throughput."""
    lines = [f"{'':<10}{'model':<16}{'top-1':>8}{'top-5':>8}"]
    if run.distiller.teacher is not None:
        teacher_top1, teacher_top5 = evaluate(run.distiller.teacher, loaders[1], world,
                                              run.autocast)
        lines.append(f"{'teacher':<10}{args.teacher:<16}{teacher_top1:>8.2f}"
                     f"{teacher_top5:>8.2f}")
    if rows:
        last = rows[-1]
        lines.append(f"{'student':<10}{args.model:<16}{last['eval_top1']:>8.2f}"
                     f"{last['eval_top5']:>8.2f}")
        rate = sum(row["img_per_s"] for row in rows) / len(rows)
        lines.append(f"{args.distiller} run: {seconds:.0f} s wall, {rate:.0f} img/s training "
                     f"(all ranks), outputs in {run.run_dir}")
    world.log("\n".join(lines))
