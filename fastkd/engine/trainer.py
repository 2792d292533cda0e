"""The distributed training loop: ``python train/main.py`` or ``torchrun ... train/main.py``.

One process per device (DDP over NCCL on CUDA, gloo on CPU); rank 0 logs and writes. Each run
folder holds ``args.yaml``, ``summary.csv``, ``last.pth``, ``best.pth`` (student weights + the
full training state) and ``curves.png``. Checkpoints are written atomically; SIGTERM/SIGINT save
``last.pth`` and exit; a non-finite loss stops the run, keeping the last good checkpoint.
"""

import csv
import math
import os
import random
import signal
import sys
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml

from .. import models  # noqa: F401  (registers the CIFAR nets in timm)
from ..data import create_loaders
from ..distillers import build_distiller
from . import checkpoint
from .config import parse_args


class World:
    """This process's place in the job, from torchrun's environment."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values):
        """Element-wise sum over ranks of a list of floats."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def min(self, value):
        """Smallest ``value`` over ranks."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor.item()

    def broadcast(self, value):
        box = [value]
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, message):
        if self.main:
            print(message, flush=True)


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


class Run:
    def __init__(self, args, world, loaders, run_dir, teacher_checkpoint=None):
        self.args, self.world, self.run_dir = args, world, run_dir
        self.train_loader, self.val_loader = loaders
        num_classes = args.num_classes or self.train_loader.num_classes
        args.num_classes = num_classes
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
        self.start_epoch, self.best_top1, self.stop_signal = 0, -1.0, None

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch):
        extras = {name: module.state_dict() for name, module in self.distiller.named_children()
                  if name not in ("student", "teacher")}
        return {"model": self.student.state_dict(), "extra": extras,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "best_top1": self.best_top1, "args": vars(self.args),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                        else None}}

    def resume(self, path):
        state = checkpoint.load(path)
        checkpoint.check_resumable(state["args"], self.args)
        self.student.load_state_dict(state["model"])
        for name, module_state in state["extra"].items():
            getattr(self.distiller, name).load_state_dict(module_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best_top1 = state["epoch"], state["best_top1"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.world.log(f"resumed {path} at epoch {self.start_epoch}")

    def save(self, epoch, top1=None):
        """last.pth (resumes at ``epoch``), and best.pth when ``top1`` is a new best."""
        if not self.world.main:
            return
        state = self.state(epoch)
        checkpoint.save_atomic(state, os.path.join(self.run_dir, "last.pth"))
        if top1 is not None and top1 >= self.best_top1:
            checkpoint.save_atomic(state, os.path.join(self.run_dir, "best.pth"))

    # -- loop -----------------------------------------------------------------------------------
    def _on_signal(self, number, frame):
        self.stop_signal = signal.Signals(number).name

    def train_epoch(self, epoch):
        args, world = self.args, self.world
        self.train_loader.set_epoch(epoch)
        self.model.train()
        totals, seen, started = {}, 0, time.perf_counter()
        # Shards differ by at most one sample, which can give one rank one more (partial) batch:
        # every rank takes the same number of steps, or DDP would wait for the missing one.
        steps = int(world.min(len(self.train_loader)))
        show = world.main and sys.stderr.isatty()
        for step, (images, target) in zip(range(steps), self.train_loader):
            with torch.autocast(world.device.type, dtype=self.autocast[1],
                                enabled=self.autocast[0]):
                _, losses = self.model(images, target, epoch=epoch + step / steps)
            loss = sum(losses.values())
            # One small all-reduce lets every rank agree to stop together (a NaN or a signal on
            # one rank would otherwise leave the others waiting in the next collective).
            finite, stopping = world.sum([float(torch.isfinite(loss).item()),
                                          float(self.stop_signal is not None)])
            if finite < world.world_size:
                values = {name: value.detach().item() for name, value in losses.items()}
                raise SystemExit(
                    f"error: non-finite loss at epoch {epoch} step {step} ({values}); the last "
                    f"good checkpoint is {os.path.join(self.run_dir, 'last.pth')}")
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
            if stopping:
                raise Stop()
        if show:
            print(file=sys.stderr)
        names = sorted(totals)
        sums = world.sum([totals[name] for name in names] + [seen])
        elapsed = time.perf_counter() - started
        return ({name: value / sums[-1] for name, value in zip(names, sums)},
                sums[-1] / elapsed, elapsed)

    def fit(self):
        args, world = self.args, self.world
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        summary_path = os.path.join(self.run_dir, "summary.csv")
        rows = read_summary(summary_path)
        for epoch in range(self.start_epoch, args.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            try:
                train_metrics, images_per_second, elapsed = self.train_epoch(epoch)
            except Stop:
                self.save(epoch)
                world.log(f"{self.stop_signal or 'signal'}: saved {self.run_dir}/last.pth "
                          f"(resumes at epoch {epoch}); exiting")
                world.barrier()
                raise SystemExit(0)
            self.scheduler.step()
            top1, top5 = evaluate(self.model, self.val_loader, world, self.autocast)
            row = {"epoch": epoch, "lr": lr,
                   **{f"train_{name}": value for name, value in train_metrics.items()},
                   "eval_top1": top1, "eval_top5": top5, "img_per_s": images_per_second,
                   "epoch_time": elapsed}
            rows.append(row)
            self.best_top1 = max(self.best_top1, top1)
            if world.main:
                write_summary(summary_path, rows)
                plot_curves(os.path.join(self.run_dir, "curves.png"), rows)
            self.save(epoch + 1, top1)
            world.log(f"epoch {epoch}: loss {train_metrics['loss']:.4f} top-1 {top1:.2f} "
                      f"top-5 {top5:.2f} ({images_per_second:.0f} img/s)")
        return rows


def read_summary(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()}
                for row in csv.DictReader(handle)]


def write_summary(path, rows):
    fields = list(dict.fromkeys(key for row in rows for key in row))
    temporary = f"{path}.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def plot_curves(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for key in rows[-1]:
        if key.startswith("train_"):
            losses.plot(epochs, [row.get(key, float("nan")) for row in rows], label=key[6:])
    losses.set(xlabel="epoch", ylabel="train loss", yscale="log")
    losses.legend()
    for key in ("eval_top1", "eval_top5"):
        accuracy.plot(epochs, [row[key] for row in rows], label=key[5:])
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)")
    accuracy.legend()
    figure.tight_layout()
    figure.savefig(f"{path}.tmp.png")
    plt.close(figure)
    os.replace(f"{path}.tmp.png", path)


def run_directory(args, world):
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), args.distiller, args.model, args.dataset])
    path = world.broadcast(os.path.join(args.output, name))
    if world.main:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "args.yaml"), "w") as handle:
            yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                            for k, v in vars(args).items()}, handle)
    world.barrier()
    return path


def demo_teacher(args, world, loaders):
    """The demo's teacher: trained once with CE on the demo data and cached in the output
    folder (``OUTPUT/demo-teacher-<name>/best.pth``)."""
    folder = os.path.join(args.output, f"demo-teacher-{args.teacher}")
    path = os.path.join(folder, "best.pth")
    if os.path.isfile(path):
        world.log(f"using the cached demo teacher {path}")
        return path
    world.log(f"training the demo teacher {args.teacher} first ({args.epochs} epochs, CE)")
    teacher_args = parse_args(["--dataset", "demo", "--distiller", "ce", "--model", args.teacher,
                               "--output", args.output, "--experiment",
                               f"demo-teacher-{args.teacher}", "--seed", str(args.seed),
                               "--workers", str(args.workers), "--loader", args.loader])
    teacher_args.amp = args.amp
    Run(teacher_args, world, loaders, run_directory(teacher_args, world)).fit()
    world.barrier()
    return path


def main(argv=None):
    args = parse_args(argv)
    world = World()
    torch.manual_seed(args.seed + world.rank)
    np.random.seed(args.seed + world.rank)
    random.seed(args.seed + world.rank)
    if args.dataset == "demo" and not world.main:
        world.barrier()  # rank 0 writes the demo JPEGs first
    loaders = create_loaders(
        args.dataset, args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
        loader=args.loader, rank=world.rank, world_size=world.world_size, device=world.device,
        workers=args.workers, channels_last=args.channels_last, seed=args.seed)
    if args.dataset == "demo" and world.main:
        world.barrier()
    started = time.perf_counter()
    teacher_checkpoint = args.teacher_checkpoint
    if (args.distiller != "ce" and args.dataset == "demo" and not teacher_checkpoint
            and not args.teacher_pretrained):
        teacher_checkpoint = demo_teacher(args, world, loaders)
    run = Run(args, world, loaders, run_directory(args, world), teacher_checkpoint)
    if args.resume:
        run.resume(args.resume)
    if args.eval_only:
        top1, top5 = evaluate(run.model, loaders[1], world, run.autocast)
        world.log(f"student {args.model}: top-1 {top1:.2f} top-5 {top5:.2f}")
        return
    rows = run.fit()
    report(args, world, run, rows, loaders, time.perf_counter() - started)


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
