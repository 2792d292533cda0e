"""The distributed training job: ``python train/main.py`` or ``torchrun ... train/main.py``.

One process per device (DDP over NCCL on CUDA, gloo on CPU); rank 0 logs and writes. Each run
folder holds ``args.yaml``, ``summary.csv``, ``last.pth``, ``best.pth`` and ``curves.png``; files
are written atomically. A stop signal (SIGTERM, SIGINT, SIGUSR1) saves ``last.pth`` where the
ranks agree to stop, and the job exits with 128 + the signal's number; resumed with the same
command it ends as if it had not stopped. A non-finite loss stops the run, keeping the last good
checkpoint. The pieces: ``config`` (flags), ``distributed`` (the process group), ``stop`` (stop
signals), ``optim`` (timm's optimiser, schedule, mixup), ``run`` (the distiller and its loop),
``evaluate``, ``run_folder`` and ``checkpoint`` (files, resume rules).
"""

import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import timm
import torch

from ..data.bad_images import BadImageError
from ..data.bad_images import logger as data_logger
from ..data.loaders import create_loaders, resolve_loader
from ..models import data_config as model_data_config
from . import checkpoint, demo_teacher, refusal, teacher_cache
from .config import DEMO_TEACHERS, check_method_options, crop_flip, distils, off_recipe_warning
from .distributed import World
from .evaluate import evaluate, last_and_best, report
from .optim import autocast_settings, resolve_amp
from .refusal import Refused
from .run import Run, build_task
from .run_folder import (
    BEST,
    LAST,
    check_not_behind,
    checkpoint_to_resume,
    create_run_folder,
    write_args,
)
from .stop import Stopped


def resume_point(args, world):
    """``(path, state)`` of the checkpoint this run continues from, checked against the run's
    settings (``checkpoint.check_resumable``), or ``(None, None)`` for a fresh run."""
    path = world.broadcast(checkpoint_to_resume(args) if world.main else None)
    if not path:
        return None, None
    state = checkpoint.load(path, "--resume")
    missing = checkpoint.missing_resume_entry(state)
    if missing:
        raise Refused(f"error: --resume {path} is not a fastkd checkpoint to resume (no "
                      f"{missing!r} entry): give a last.pth that fastkd's trainer wrote")
    saved_processes = len(state.get("ranks") or state["rng"])
    checkpoint.check_resumable(state["args"], args, saved_processes, world.world_size)
    if args.resume != "auto":  # auto restarts a job where it was
        check_not_behind(path, (state["epoch"], state.get("step", 0)))
    saved_epochs = state["args"]["epochs"]
    if args.epochs > saved_epochs and not has_finished(state, args):
        world.log(f"--epochs {saved_epochs} -> {args.epochs}: the learning-rate schedule is "
                  f"recomputed for {args.epochs} epochs")
    return path, state


def has_finished(state, args):
    """Whether the checkpoint ``state`` has trained all of ``args.epochs``."""
    return state is not None and state["epoch"] >= args.epochs


def open_run(args, world, loaders, data_config, resume, teacher_checkpoint=None,
             cached_teacher=None):
    """The run (models, optimiser, resumed from ``resume_point``'s ``resume``), then, once it is
    known to start, its folder and args.yaml: a failed start writes nothing."""
    resume_from, state = resume
    run = Run(args, world, loaders, data_config, teacher_checkpoint, cached_teacher)
    if run.task.teacher is not None:
        run.check_teacher()
    elif cached_teacher is not None:
        run.check_teacher(recorded=cached_teacher.cache.manifest["teacher_accuracy"])
    if state:
        run.resume(state, resume_from)
    run.run_dir = world.broadcast(create_run_folder(args, resume_from) if world.main else None)
    args.experiment = os.path.basename(run.run_dir)  # as taken, suffix included
    if world.main:
        write_args(run.run_dir, args)
    world.log(f"run folder: {run.run_dir}")
    return run


def train_demo_teacher(args, world, loaders, data_config):
    """The demo's teacher checkpoint: trained once with CE and reused while its completion
    record matches; an interrupted teacher resumes from its ``last.pth``."""
    teacher_args = demo_teacher.teacher_args(args)
    finished, changed = world.broadcast(
        demo_teacher.finished(teacher_args) if world.main else None)
    if changed:  # never silently reused, nor overwritten
        folder = os.path.join(teacher_args.output, teacher_args.experiment)
        raise Refused(f"error: {folder} holds the {args.dataset} teacher trained with other "
                      f"settings ({'; '.join(changed)}): remove that folder to train it "
                      "again, or give another --output")
    if finished:
        world.log(f"using the cached {args.dataset} teacher {finished}")
        return finished
    resume = resume_point(teacher_args, world)
    if has_finished(resume[1], teacher_args):  # stopped after its last epoch, before its record
        folder = os.path.dirname(resume[0])
    else:
        world.log(f"training the {args.dataset} teacher {teacher_args.model} first "
                  f"({teacher_args.epochs} epochs, CE)")
        seed_everything(teacher_args, world)  # its init owes nothing to what ran before it
        run = open_run(teacher_args, world, loaders, data_config, resume)
        run.fit()
        folder = run.run_dir
    if world.main:
        demo_teacher.mark_finished(teacher_args, folder)
    world.barrier()
    return os.path.join(folder, BEST)


def seed_everything(args, world):
    """Each rank's own seed for torch, numpy and random: set before each run (teacher, baseline,
    student), so that runs compared with each other start alike."""
    torch.manual_seed(args.seed + world.rank)
    np.random.seed(args.seed + world.rank)
    random.seed(args.seed + world.rank)


def train_demo_baseline(args, world, loaders, data_config, resumed_state):
    """The demo's CE-only student: the distilled student's model, seed and schedule without a
    teacher, trained first so that the closing table shows what distillation adds. With
    ``--resume auto`` it continues in its own folder, or is read back there once finished; a
    run resumed from its checkpoint (``resumed_state``) finds it where that run recorded it
    (``demo_baseline``, which the distilled run's checkpoint keeps). None when there is none."""
    baseline = argparse.Namespace(**{**vars(args), "distiller": "ce", "teacher_checkpoint": None})
    if args.experiment:
        baseline.experiment = f"{args.experiment}-ce-baseline"
    seed_everything(args, world)
    resume = (None, None)
    if args.resume == "auto":
        resume = resume_point(baseline, world)
    elif resumed_state:
        recorded = resumed_state["args"].get("demo_baseline")
        last = os.path.join(recorded, LAST) if recorded else None
        # Decided on rank 0 for every rank, as checkpoint_to_resume is.
        if not world.broadcast(bool(last and os.path.isfile(last)) if world.main else None):
            world.log(f"no CE baseline to compare with: {args.resume} records "
                      f"{last or 'none'}")
            return None
        baseline.resume = last
        resume = resume_point(baseline, world)
    if has_finished(resume[1], baseline):
        world.log(f"using the finished CE baseline {resume[0]}")
        args.demo_baseline = os.path.dirname(os.path.abspath(resume[0]))
        return argparse.Namespace(args=baseline, rows=resume[1]["summary"])
    world.log(f"training the CE baseline {args.model} first ({args.epochs} epochs, no teacher)")
    run = open_run(baseline, world, loaders, data_config, resume)
    args.demo_baseline = run.run_dir
    run.fit()
    return run


def open_loaders(args, world, data_config):
    """This rank's ``(train_loader, val_loader)`` for ``args`` (the trainer's and the teacher
    cache builder's), their settings errors as the flags' errors. Rank 0 writes what the others
    read (the demo JPEGs, the verification cache) before they start."""
    if args.dataset != "synthetic":  # "auto" is what this machine has: recorded as resolved
        try:
            args.loader = resolve_loader(args.loader, args.dataset, world.device)
        except ValueError as error:
            raise Refused(f"error: --loader {args.loader}: {error}") from None
    if not world.main:
        # Bad-image warnings come from rank 0 alone: share_bad_images relays other ranks' finds.
        data_logger.setLevel(logging.ERROR)
        world.barrier()
    try:
        loaders = create_loaders(
            args.dataset, args.data_dir, batch_size=args.batch_size,
            image_size=data_config["input_size"][-1], mean=data_config["mean"],
            std=data_config["std"], crop_ratio=data_config["crop_pct"], auto_augment=args.aa,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            crop_flip=crop_flip(args),
            loader=args.loader, rank=world.rank, world_size=world.world_size,
            device=world.device, workers=args.workers, channels_last=args.channels_last,
            seed=args.seed, bad_images=args.bad_images, num_classes=args.num_classes,
            synthetic_samples=args.synthetic_samples, val_split=args.val_split,
            augment_views=args.augment_views)
    except BadImageError:
        raise
    except ValueError as error:  # a setting the loaders refuse (--aa, ...), before any file
        raise Refused(f"error: {error}") from None
    except FileNotFoundError as error:  # a split's folder
        raise Refused(f"error: --data-dir {args.data_dir}: {error}") from None
    finally:
        if world.main:
            world.barrier()
    world.log(f"loader: {type(loaders[0]).__name__} ({args.dataset}, "
              f"{data_config['input_size'][-1]} px)")
    return loaders


def run_job(args, world):
    if world.distributed:
        world.log(f"process group: {torch.distributed.get_backend()}, {world.world_size} "
                  f"process{'es' if world.world_size > 1 else ''} on {world.device.type}")
    torch.backends.cudnn.benchmark = True  # as timm's train.py: fixed shapes, fastest kernels
    resolve_amp(args, world.device, world.log)  # args.yaml records what trains
    seed_everything(args, world)
    # The student's timm data config decides the input size and normalisation, as in timm.
    data_config = model_data_config(args.model, args.img_size, args.input_size)
    loaders = open_loaders(args, world, data_config)
    for loader in loaders:  # their worker processes, before any collective (TorchLoader.start)
        loader.start()
    try:
        return train_or_evaluate(args, world, loaders, data_config)
    finally:
        for loader in loaders:  # their workers stop now, not at interpreter shutdown
            loader.close()


def train_or_evaluate(args, world, loaders, data_config):
    data_classes = loaders[0].num_classes
    if data_classes < 2:
        raise Refused(f"error: --data-dir {args.data_dir} has {data_classes} class folder: "
                      "classification needs at least 2")
    if args.num_classes not in (None, data_classes):
        raise Refused(f"error: --num-classes {args.num_classes} but the data has "
                      f"{data_classes} classes")
    args.num_classes = data_classes
    check_method_options(args)
    if args.eval_only:
        return evaluate_checkpoint(args, world, loaders[1])
    warning = off_recipe_warning(args)
    if warning:
        world.log(warning)
    if not len(loaders[0]):
        processes = f"{world.world_size} process{'es' if world.world_size > 1 else ''}"
        raise Refused(
            f"error: --batch-size {args.batch_size} x {processes} = "
            f"{args.batch_size * world.world_size} is more than the "
            f"{loaders[0].dataset_size} training samples: an epoch trains full global batches")
    started = time.perf_counter()
    cached_teacher = (teacher_cache.open_for_run(args, world, loaders[0], data_config)
                      if args.teacher_cache else None)
    resume = resume_point(args, world)  # refused settings cost no demo teacher
    if has_finished(resume[1], args):
        rows = resume[1]["summary"]
        last, best = last_and_best(rows)
        world.log(f"{resume[0]} has trained all {args.epochs} epochs (top-1 "
                  f"{last['eval_top1']:.2f} last, {best['eval_top1']:.2f} best): nothing to do; "
                  "a larger --epochs trains on")
        return
    # The demo: distillation from the demo teacher, beside a CE baseline (a resumed run's
    # baseline is its first run's).
    demo = (distils(args) and args.dataset in DEMO_TEACHERS and not args.teacher_checkpoint
            and not args.teacher_pretrained and not args.teacher_cache)
    if demo:
        build_task(args, data_config)  # settings the models refuse cost no demo teacher
        # args.yaml names the teacher used
        args.teacher_checkpoint = train_demo_teacher(args, world, loaders, data_config)
    baseline = train_demo_baseline(args, world, loaders, data_config, resume[1]) if demo else None
    seed_everything(args, world)
    run = open_run(args, world, loaders, data_config, resume, args.teacher_checkpoint,
                   cached_teacher)
    run.fit()
    report(args, world, run, baseline, time.perf_counter() - started)


def evaluate_checkpoint(args, world, val_loader):
    """--eval-only: the checkpoint's student, and its EMA student when it has one; returns
    ``{"student": (top1, top5, loss), "EMA student": ...}`` (as logged) for callers in code."""
    autocast = autocast_settings(args)
    has_ema = "state_dict_ema" in checkpoint.load(args.eval_only, "--eval-only")
    results = {}
    for label, use_ema in (("student", False), ("EMA student", True))[:1 + has_ema]:
        model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
        checkpoint.load_weights(model, args.eval_only, flag="--eval-only", use_ema=use_ema,
                                arch=args.model)
        top1, top5, loss = evaluate(model.to(world.device), val_loader, world, autocast)
        world.log(f"{label} {args.model} ({args.eval_only}): top-1 {top1:.2f} top-5 {top5:.2f} "
                  f"loss {loss:.4f}")
        results[label] = (top1, top5, loss)
    return results


def run_job_and_exit(args):
    """Run the job of ``args`` (``config.parse_args``'s, already checked) in this process's
    place in the process group, then exit with its status."""
    world = World()
    world.stop.install()
    refused = None
    try:
        run_job(args, world)
        status = 0
    except Stopped as stop:  # a signal outside training, where there is nothing to save
        world.log(f"{stop.name}: exiting")
        status = 128 + stop.number
    except Refused as error:  # settings every process refuses alike: said once (below)
        refused, status = error, 1
    except SystemExit as stop:  # the run's own stops: a signal, a non-finite loss
        status = stop.code
    except BadImageError as error:  # with --bad-images error: at start, or met while reading
        status = f"error: --bad-images error: {error}"
    world.stop.uninstall()  # the job is ending
    # Only now are run_job's frames, and the DDP modules that hold the process group, gone.
    world.close()
    sys.exit(refusal.exit_status(refused, world.local_rank) if refused else status)
