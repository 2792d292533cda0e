"""A run: the distiller (a timm TrainingTask), its optimiser and schedule, the epoch loop and its
checkpoints.

Checkpoints are timm-shaped: the student's weights under ``state_dict`` (the EMA student's under
``state_dict_ema``), so ``timm.models.load_checkpoint(student, "best.pth")`` loads them, and every
entry is a tensor or a plain value, so ``torch.load(..., weights_only=True)`` reads them. The rest
(optimiser, scaler, the place in training as epoch and step, args, data_config, summary rows, bad
images, each rank's ``rank_state``) is what ``--resume`` needs to continue exactly.
"""

import math
import os
import time

import timm
import torch
from timm.utils import dispatch_clip_grad, distribute_bn, unwrap_model

from ..data.bad_images import logger as data_logger
from ..data.order import batch_seed, seeded_globals
from ..distillers import build_distiller
from . import checkpoint
from .config import method_options
from .evaluate import evaluate
from .optim import autocast_settings, create_mixup, create_optimizer, create_scheduler
from .refusal import Refused
from .run_folder import BEST, LAST, describe, plot_curves, write_bad_images, write_summary
from .stop import Stopped

# curves.png is redrawn at an epoch's end at most this often, and always after the last epoch:
# drawing takes ~0.2 s of CPU, 2 % of a 10 s epoch (CIFAR on a GPU); summary.csv is rewritten
# every epoch.
CURVES_EVERY_S = 60


def build_task(args, data_config, teacher_checkpoint=None, cached_teacher=None):
    """The distiller of ``args.distiller`` around fresh timm models, the teacher's weights loaded.
    The student's input is normalised as ``data_config`` says; a fastkd-trained teacher is fed
    the normalisation it was trained with (its checkpoint's ``data_config``), any other teacher
    that of its timm pretrained_cfg. With a ``cached_teacher`` (``teacher_cache.CachedTeacher``)
    no teacher is built: each step brings its outputs."""
    student = create_model(args.model, args.model_kwargs, "--model", args.num_classes)
    size = data_config["input_size"][-1]
    check_input_size(args.model, args.model_kwargs, "--model", args.num_classes, size)
    teacher, settings = None, {}
    if cached_teacher is not None and args.distiller == "hcd":
        settings["teacher_width"] = cached_teacher.embedding_width
    elif args.distiller != "ce" and cached_teacher is None:
        # Drawn apart from the global stream, so that what is drawn after it (HCD's projectors
        # and mappers) is the same whether the teacher is built or read from a cache.
        with torch.random.fork_rng(devices=[]):
            teacher = create_model(args.teacher, args.teacher_kwargs, "--teacher",
                                   args.num_classes, pretrained=args.teacher_pretrained)
        check_input_size(args.teacher, args.teacher_kwargs, "--teacher", args.num_classes, size)
        if teacher_checkpoint:
            checkpoint.load_weights(teacher, teacher_checkpoint, arch=args.teacher)
            trained_with = checkpoint.data_config_of(teacher_checkpoint, "--teacher-checkpoint")
            if trained_with:
                teacher.pretrained_cfg = {**(getattr(teacher, "pretrained_cfg", None) or {}),
                                          "mean": tuple(trained_with["mean"]),
                                          "std": tuple(trained_with["std"])}
    try:
        return build_distiller(args.distiller, student, teacher, method_options(args),
                               label_smoothing=args.smoothing, student_mean=data_config["mean"],
                               student_std=data_config["std"], **settings)
    except ValueError as error:  # e.g. --hcd-stages beyond the student's stages
        raise Refused(f"error: --distiller {args.distiller} on --model {args.model}: "
                      f"{error}") from None


def create_model(name, kwargs, flag, num_classes, pretrained=False):
    """timm.create_model; keyword arguments the model refuses, and pretrained weights that cannot
    be had, are an error naming the flag."""
    try:
        return timm.create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError) as error:
        given = " ".join(f"{key}={value}" for key, value in kwargs.items())
        raise Refused(f"error: {flag} {name} {f'(kwargs {given}) ' if given else ''}"
                      f"cannot be built: {error}") from None
    except Exception as error:  # the hub's and the network's errors, whatever their class
        if not pretrained:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise Refused(f"error: --teacher-pretrained: cannot get {name}'s pretrained weights "
                      f"({type(error).__name__}: {reason}); with no network they must be in "
                      "the Hugging Face cache already, or give --teacher-checkpoint "
                      "FILE") from None


def check_input_size(name, kwargs, flag, num_classes, size):
    """Refuse a model that cannot take ``size`` x ``size`` inputs (a ViT built for 224 px at
    --img-size 32), before any folder is made: one forward pass of a shape-only copy on the
    meta device, which costs no compute and no weights."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
        try:
            model(torch.empty(1, 3, size, size))
        except NotImplementedError:  # an operation without a meta kernel: the run will tell
            return
        except (AssertionError, RuntimeError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise Refused(f"error: {flag} {name} does not take {size}x{size} inputs "
                          f"(--img-size {size}): {reason}; timm's ViTs take {flag}-kwargs "
                          f"img_size={size}") from None


class StepMeter:
    """An epoch's loss parts summed over samples, for the epoch and since the last log point,
    and the first step whose loss was not finite (-1: none), all kept on the device so that a
    step reads nothing back. ``seen`` counts samples on the host (batch sizes are shapes);
    ``seconds`` and ``data_seconds`` the epoch's time and its wait for data, before this process
    took it over too when the epoch was resumed."""

    def __init__(self, device):
        self.names, self.totals, self.interval = None, None, None
        self.seen = self.interval_seen = 0
        self.seconds = self.data_seconds = 0.0
        self.first_bad_step = torch.tensor(-1, device=device)

    def add(self, result, step):
        if self.names is None:
            self.names = ["loss", *sorted(set(result) - {"loss", "output"})]
            self.totals = torch.zeros(len(self.names), device=self.first_bad_step.device)
            self.interval = torch.zeros_like(self.totals)
        batch = len(result["output"])
        parts = torch.stack([result[name].detach().float() for name in self.names]) * batch
        self.totals += parts
        self.interval += parts
        self.seen += batch
        self.interval_seen += batch
        bad = ~torch.isfinite(result["loss"].detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)

    def interval_means(self):
        """``{name: mean since the last log point}``: one read of the device."""
        return dict(zip(self.names, (self.interval / self.interval_seen).tolist()))

    def start_interval(self):
        self.interval.zero_()
        self.interval_seen = 0

    def state(self):
        """This rank's sums so far, as plain values and CPU tensors (for a checkpoint taken
        mid-epoch; the non-finite flag is clear there, or the run would have stopped)."""
        return {"names": self.names, "totals": None if self.totals is None else self.totals.cpu(),
                "seen": self.seen, "seconds": self.seconds, "data_seconds": self.data_seconds}

    @classmethod
    def restored(cls, states, device):
        """The meter that continues ``states`` (``state()`` of one rank, or of every rank of a
        run resumed on another number of processes: summed into one; the epoch's means are
        sums over all ranks anyway)."""
        meter = cls(device)
        states = [state for state in states if state and state["names"]]
        if states:
            meter.names = states[0]["names"]
            meter.totals = sum(state["totals"] for state in states).to(device)
            meter.interval = torch.zeros_like(meter.totals)
            meter.seen = sum(state["seen"] for state in states)
            meter.seconds = max(state["seconds"] for state in states)
            meter.data_seconds = max(state["data_seconds"] for state in states)
        return meter


def measure_teacher(args, world, task, val_loader, autocast):
    """The teacher's validation accuracy ``{"top1", "top5", "samples"}`` (%, over ``samples``
    images), logged and checked (``check_teacher_accuracy``): before a live run trains, and
    before a teacher cache is built (its manifest keeps it for the runs it serves)."""
    top1, top5, _ = evaluate(task.teacher, val_loader, world, autocast, task.teacher_input)
    accuracy = {"top1": top1, "top5": top5, "samples": val_loader.dataset_size}
    check_teacher_accuracy(args, world, accuracy)
    return accuracy


def check_teacher_accuracy(args, world, accuracy, source=""):
    """Log the teacher's ``accuracy`` (``measure_teacher``'s; ``source`` says where it was
    measured, if not now) and refuse a teacher no better than chance, 1/C plus three binomial
    standard errors, unless --allow-untrained-teacher."""
    top1 = accuracy["top1"]
    world.log(f"teacher {args.teacher}: top-1 {top1:.2f} top-5 {accuracy['top5']:.2f}{source}")
    chance = 1 / args.num_classes
    threshold = 100 * (chance + 3 * math.sqrt(chance * (1 - chance) / accuracy["samples"]))
    if top1 <= threshold and not args.allow_untrained_teacher:
        raise Refused(
            f"error: the teacher {args.teacher} scores {top1:.2f}% top-1, no better than chance "
            f"({100 * chance:.2f}%): are its weights loaded (--teacher-checkpoint, "
            "--teacher-pretrained)? --allow-untrained-teacher distils from it anyway")


class Run:
    """A distiller under training. ``run_dir`` is set by ``open_run`` once the run is known to
    start."""

    def __init__(self, args, world, loaders, data_config, teacher_checkpoint=None,
                 cached_teacher=None):
        self.args, self.world, self.data_config, self.run_dir = args, world, data_config, None
        self.train_loader, self.val_loader = loaders
        self.cached_teacher = cached_teacher  # teacher_cache.CachedTeacher, or None
        self.task = build_task(args, data_config, teacher_checkpoint, cached_teacher).to(
            world.device)
        if args.channels_last:
            self.task.to(memory_format=torch.channels_last)
        self.autocast = autocast_settings(args)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast.needs_grad_scaler)
        # timm's order: optimiser and EMA over the plain module, then compile, then DDP.
        self.optimizer = create_optimizer(args, self.task.get_trainable_module(),
                                          grad_scaler=self.scaler.is_enabled())
        self.scheduler = create_scheduler(args, self.optimizer)
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay)
        if args.torchcompile:
            self.task.compile(backend=args.torchcompile)
        if world.distributed:
            self.task.prepare_distributed(
                device_ids=[world.local_rank] if world.device.type == "cuda" else None)
        self.mixup = create_mixup(args, args.num_classes)
        self.best_top1, self.updates = -1.0, 0
        # Where training continues: (epoch, steps of it done), with the unfinished epoch's
        # meter when a run resumes mid-epoch.
        self.position, self.resumed_meter = (0, 0), None
        self.saved_position = None  # that of the last checkpoint this run wrote
        self.meter = None  # the epoch in progress's StepMeter
        self.teacher_accuracy = None  # (top-1, top-5), from check_teacher
        self.rows = []  # summary.csv's rows, one per finished epoch
        self.curves_drawn = time.monotonic()  # when curves.png was last drawn (or the run began)
        self.bad_images = {}  # {path: reason}: image files skipped so far, found by any rank

    def eval_models(self):
        """``{"": student, "ema_": EMA student}`` (the EMA only with --model-ema), unwrapped from
        DDP, whose forward would take part in collectives."""
        models = {"": self.task.get_eval_model()}
        if self.task.has_ema():
            models["ema_"] = self.task.get_eval_model(ema=True)
        return {prefix: model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel)
                else model for prefix, model in models.items()}

    def check_teacher(self, recorded=None):
        """The teacher's validation accuracy, logged before training: measured now, or
        ``recorded`` by the build of the run's teacher cache (its manifest's
        ``teacher_accuracy``). A teacher no better than chance stops the run before it starts
        (``check_teacher_accuracy``)."""
        if recorded is None:
            accuracy = measure_teacher(self.args, self.world, self.task, self.val_loader,
                                       self.autocast)
        else:
            accuracy = recorded
            check_teacher_accuracy(self.args, self.world, recorded, source=(
                f", measured by the build of --teacher-cache {self.args.teacher_cache}"))
        self.teacher_accuracy = accuracy["top1"], accuracy["top5"]

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, epoch, step, ranks):
        """The checkpoint of a run at ``step`` steps into ``epoch`` (0: at its start); ``ranks``:
        each rank's ``rank_state``."""
        state = {"arch": self.args.model, **self.task.get_checkpoint_state()}
        if self.task.has_ema():
            state.update(self.task.get_checkpoint_state(ema=True))
        return {**state, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step,
                "updates": self.updates, "best_top1": self.best_top1, "args": vars(self.args),
                "data_config": self.data_config, "summary": self.rows,
                "bad_images": self.bad_images, "ranks": ranks}

    def rank_state(self, meter):
        """What differs between ranks and a resume needs: the random generators (dropout, ...),
        and mid-epoch the epoch's sums so far (``meter``) and the EMA's buffers (each rank
        averages its own BatchNorm statistics into them until the epoch's end)."""
        state = {"rng": checkpoint.rng_state(), "meter": meter.state() if meter else None}
        if meter and self.task.has_ema():
            state["ema_buffers"] = {name: buffer.detach().cpu() for name, buffer in
                                    self.task.get_trainable_module(ema=True).named_buffers()}
        return state

    def resume(self, state, path):
        """Continue from ``state``, the checkpoint at ``path`` (already checked against this
        run's settings)."""
        self.task.load_checkpoint_state(state["state_dict"], state.get("task_state"))
        if self.task.has_ema():
            if "state_dict_ema" in state:
                self.task.load_checkpoint_state(state["state_dict_ema"],
                                                state.get("task_state_ema"), ema=True)
            else:
                self.world.log(f"warning: {path} has no EMA weights: the EMA restarts from the "
                               "student's")
                self.task.get_trainable_module(ema=True).set(
                    unwrap_model(self.task.get_trainable_module()))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = self.saved_position = (state["epoch"], state.get("step", 0))
        self.best_top1, self.updates = state["best_top1"], state["updates"]
        # The checkpoint's rows, not summary.csv: a crash between the two writes at an epoch's
        # end would otherwise repeat or lose that epoch's row.
        self.rows, self.bad_images = state["summary"], state["bad_images"]
        ranks = state.get("ranks") or [{"rng": rng, "meter": None} for rng in state["rng"]]
        world = self.world
        if len(ranks) == world.world_size:
            own = ranks[world.rank]
            checkpoint.set_rng_state(own["rng"])  # dropout and the like continue as they were
            self.resumed_meter = StepMeter.restored([own["meter"]], world.device)
            for name, buffer in own.get("ema_buffers", {}).items():
                self.task.get_trainable_module(ema=True).get_buffer(name).copy_(buffer)
        else:
            world.log(f"warning: {path} was saved by {len(ranks)} processes and this run has "
                      f"{world.world_size}: it continues the same global batches, but the "
                      "ranks' random streams (dropout, mixup) start from this run's seeds and "
                      "the results agree only up to the order of the sums")
            self.resumed_meter = StepMeter.restored(
                [rank["meter"] for rank in ranks] if world.main else [], world.device)
        epoch, step = self.position
        within = f", step {step}/{len(self.train_loader)}" if step else ""
        world.log(f"resumed {path} at epoch {epoch}{within}")

    def save(self, epoch, step=0, meter=None, best=False):
        """last.pth, resuming ``step`` steps into ``epoch`` (``meter``: that epoch's sums so
        far), and best.pth too if ``best``. Every rank calls it: the checkpoint holds each rank's
        ``rank_state``."""
        ranks = self.world.gather(self.rank_state(meter))
        self.saved_position = (epoch, step)
        if not self.world.main:
            return
        state = self.state(epoch, step, ranks)
        # best.pth first: a run killed between the two writes resumes from the previous
        # last.pth and trains this epoch again. The other order would leave a last.pth whose
        # best_top1 names an epoch that no best.pth holds, and a resumed run that never
        # improves on it would end without one.
        if best:
            checkpoint.save_atomic(state, os.path.join(self.run_dir, BEST))
        checkpoint.save_atomic(state, os.path.join(self.run_dir, LAST))

    def saved_checkpoint(self):
        """Where a stopped run can resume from, in words."""
        if self.saved_position is None:
            return "no checkpoint was saved before it"
        return (f"the last good checkpoint is {os.path.join(self.run_dir, LAST)} (resumes at "
                f"{describe(*self.saved_position)})")

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
    def step(self, images, target, epoch, step, steps, teacher_outputs=None):
        """One forward pass at ``step`` of ``epoch`` (of ``steps``); returns the task's dict.
        Mixup's pairs and lambda are drawn from this rank's batch seed (``order.batch_seed``):
        a resumed run draws what the uninterrupted one did. ``teacher_outputs``: the step's,
        from the teacher cache (never with mixup: the trainer refuses the two together)."""
        if self.mixup is not None and epoch < (self.args.mixup_off_epoch or float("inf")):
            even = len(target) - len(target) % 2  # timm's Mixup pairs samples: an odd last
            with seeded_globals(batch_seed(self.args.seed, epoch, step, self.world.rank)):
                images, target = self.mixup(images[:even], target[:even])  # one sits out
        with self.autocast(self.world.device.type):
            return self.task(images, target, epoch=epoch + step / steps,
                             teacher_outputs=teacher_outputs)

    def backward(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.task.get_clip_parameters(), self.args.clip_grad,
                               mode=self.args.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.updates += 1
        self.task.update_ema(step=self.updates)

    def train_epoch(self, epoch, start_step, meter):
        """Steps ``start_step`` to the end of ``epoch``, summed into ``meter``.

        A step reads nothing back from the device: on a GPU each read (``item``, ``tolist``,
        ``bool``) waits for all queued work and stops the host from queueing the next step. The
        loss parts and a non-finite flag accumulate on the device; every ``--log-interval``
        steps and at the epoch's end they are read once, and one all-reduce lets every rank
        agree to stop together on a non-finite loss. Stop signals are agreed on at every step
        boundary without the device (``stop.StopVote``): ``Stopped`` carries the steps done.
        Every ``--recovery-interval`` steps the run saves where it is.
        """
        args, world = self.args, self.world
        steps = len(self.train_loader)  # full global batches: the same on every rank
        self.train_loader.set_epoch(epoch, start_step)
        self.task.train()
        started = checked = time.perf_counter()
        seconds_before, data_before = meter.seconds, meter.data_seconds
        batches = iter(self.train_loader)
        # The teacher cache's rows, a step ahead on a thread: a generator, whose reader thread
        # ends when it is closed, which CPython does as soon as this frame is let go of (also
        # when a stop or an error leaves the epoch early).
        cached = self.cached_teacher.epoch(epoch, start_step) if self.cached_teacher else None
        for step in range(start_step, steps):
            number = world.stop.poll()
            if number:
                raise Stopped(number, step)
            meter.seconds = seconds_before + time.perf_counter() - started
            if args.recovery_interval and step > start_step and not step % args.recovery_interval:
                self.save(epoch, step, meter)
            waiting = time.perf_counter()
            images, target = next(batches)
            teacher_outputs = next(cached) if cached else None
            meter.data_seconds += time.perf_counter() - waiting
            result = self.step(images, target, epoch, step, steps, teacher_outputs)
            meter.add(result, step)
            self.backward(result["loss"])
            if (step + 1) % args.log_interval and step + 1 < steps:
                continue
            bad_step, = world.max([meter.first_bad_step])
            if bad_step >= 0:
                raise SystemExit(f"error: non-finite loss at epoch {epoch} step {int(bad_step)} "
                                 f"(seen at step {step}); {self.saved_checkpoint()}")
            if world.main:
                now = time.perf_counter()
                parts = " ".join(f"{name} {value:.4f}"
                                 for name, value in meter.interval_means().items())
                rate = meter.interval_seen * world.world_size / (now - checked)
                eta = (now - started) / (step + 1 - start_step) * (steps - step - 1)
                data_share = (meter.data_seconds - data_before) / (now - started)
                world.log(f"epoch {epoch} [{step + 1}/{steps}] {parts} "
                          f"lr {self.optimizer.param_groups[0]['lr']:.3g} {rate:.0f} img/s "
                          f"data {100 * data_share:.0f}% eta {eta:.0f} s")
                checked = now
            meter.start_interval()
        meter.seconds = seconds_before + time.perf_counter() - started

    def epoch_means(self, meter):
        """``(mean loss parts, img/s, seconds, seconds waiting for data)`` of an epoch's meter,
        over all ranks."""
        sums = self.world.sum([*meter.totals, meter.seen])
        return ({name: value / sums[-1] for name, value in zip(meter.names, sums)},
                sums[-1] / meter.seconds, meter.seconds, meter.data_seconds)

    def synchronise_batch_norm(self):
        """timm's --dist-bn reduce: every rank evaluates (and rank 0 saves) the same BatchNorm
        statistics, the mean of the ranks'."""
        if self.world.distributed:
            for ema in (False, True)[:1 + self.task.has_ema()]:
                distribute_bn(self.task.get_trainable_module(ema=ema), self.world.world_size,
                              reduce=True)

    def evaluate_epoch(self, steps):
        """``eval_[ema_]loss/top1/top5`` of the student (and EMA student). A stop signal agreed on
        between two evaluation batches raises ``Stopped`` with the epoch's ``steps`` all done."""
        def poll():
            number = self.world.stop.poll()
            if number:
                raise Stopped(number, steps)

        accuracy = {}
        for prefix, model in self.eval_models().items():
            top1, top5, loss = evaluate(model, self.val_loader, self.world, self.autocast,
                                        poll=poll)
            accuracy.update({f"eval_{prefix}loss": loss, f"eval_{prefix}top1": top1,
                             f"eval_{prefix}top5": top5})
        return accuracy

    def memory_use(self):
        """``{"max_memory_gib": peak CUDA memory allocated since the last call}`` (empty on
        CPU)."""
        if self.world.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.world.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.world.device)
        return {"max_memory_gib": peak}

    def fit(self):
        """Train to ``args.epochs``; returns summary.csv's rows.

        A stop signal (SIGTERM, SIGINT, SIGUSR1; see ``stop.py``) stops every rank at the same
        boundary, between two training steps or two evaluation batches, within two steps of the
        first rank's signal: the run saves last.pth there and exits with 128 + the signal's
        number. Resumed with the same command, it ends as if it had not stopped.
        """
        vote = self.world.stop
        vote.deferred = True
        try:
            self._fit()
            number = vote.settle()  # one that came during the last epoch's end: all is saved
            if number:
                raise Stopped(number)
        except Stopped as stop:
            self.stop(stop)
        finally:
            vote.deferred = False
        return self.rows

    def stop(self, stop):
        """Save where the ranks agreed to stop (unless that is where the run last saved), then
        exit as a shell reports a job killed by the signal: a scheduler must not mistake a
        stopped job for a finished one."""
        epoch, step = self.position
        if stop.step is not None and (epoch, stop.step) != self.saved_position:
            self.save(epoch, stop.step, self.meter)
        self.world.log(f"{stop.name}: saved {os.path.join(self.run_dir, LAST)} (resumes at "
                       f"{describe(*self.saved_position)}); exiting")
        self.world.barrier()  # every rank exits once rank 0 has saved
        raise SystemExit(128 + stop.number)

    def _fit(self):
        args, world = self.args, self.world
        self.share_bad_images()  # those found before the first step
        first_epoch, start_step = self.position
        steps = len(self.train_loader)
        for epoch in range(first_epoch, args.epochs):
            self.scheduler.step(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            self.meter = self.resumed_meter or StepMeter(world.device)
            self.resumed_meter = None
            self.position = (epoch, start_step)
            if start_step < steps:
                self.train_epoch(epoch, start_step, self.meter)
                self.synchronise_batch_norm()
            accuracy = self.evaluate_epoch(steps)
            train_metrics, images_per_second, elapsed, data_time = self.epoch_means(self.meter)
            # With an EMA its accuracy picks best.pth, as in timm.
            top1 = accuracy["eval_ema_top1" if self.task.has_ema() else "eval_top1"]
            self.rows.append({
                "epoch": epoch, "lr": lr,
                **{f"train_{name}": value for name, value in train_metrics.items()},
                **accuracy, "img_per_s": images_per_second, "epoch_time": elapsed,
                "data_wait": data_time / elapsed, **self.memory_use(),
                "bad_images": self.share_bad_images()})
            # The first of tied epochs stays best, as the closing table and timm count it.
            new_best = top1 > self.best_top1
            self.best_top1 = max(self.best_top1, top1)
            self.meter, self.position, start_step = None, (epoch + 1, 0), 0
            self.save(epoch + 1, best=new_best)
            if world.main:
                write_summary(self.run_dir, self.rows)
                last = epoch == args.epochs - 1
                if last or time.monotonic() - self.curves_drawn >= CURVES_EVERY_S:
                    teacher = f" <- {args.teacher}" if self.task.teacher is not None else ""
                    plot_curves(self.run_dir, self.rows,
                                f"{args.distiller}: {args.model}{teacher} ({args.dataset})")
                    self.curves_drawn = time.monotonic()
            world.log(f"epoch {epoch}: train loss {train_metrics['loss']:.4f}, eval loss "
                      f"{accuracy['eval_loss']:.4f} top-1 {accuracy['eval_top1']:.2f} top-5 "
                      f"{accuracy['eval_top5']:.2f} ({images_per_second:.0f} img/s)")
        return self.rows

