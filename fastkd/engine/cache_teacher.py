"""``fastkd-cache-teacher`` / ``train/cache_teacher.py``: build a teacher-output cache
(``teacher_cache``), plainly or under torchrun (rank r computes every world-size-th shard), or
check one against the live teacher (``--verify``).

The teacher runs exactly as in a live run: the trainer's loaders (each view read through
``set_epoch(view, slots=...)``, so every augmentation draw is the training epoch's), its task
(``run.build_task``: the same weights, input conversion and outputs) and its autocast.
"""

import os
import sys

import numpy as np
import timm
import torch

from .. import __version__
from ..models import data_config as model_data_config
from ..models.taps import embedding_width
from . import refusal, teacher_cache
from .distributed import World
from .optim import autocast_settings, resolve_amp
from .refusal import Refused
from .run import build_task, measure_teacher
from .stop import Stopped
from .teacher_cache import BUILD, MANIFEST, SHARD_ROWS, CacheError, TeacherCache
from .trainer import open_loaders, seed_everything

VERIFY_SAMPLES = 64
# Half a unit in the last place, relative: the rounding of a value stored or computed in each
# dtype. --verify allows 4 of the coarser of the cache's dtype and the precision it was computed
# in (the recomputation's other batch composition can flip a rounding more than once), plus 1e-5.
HALF_ULP = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}


class TeacherRunner:
    """The run's teacher on this rank's training loader: ``outputs(view, slots)`` gives the
    teacher's outputs for samples ``slots`` as epoch ``view`` augments them, read in the
    loader's batches: ``{"logits": [n, C], "embedding": [n, d_t]}`` (float32, on the device)."""

    def __init__(self, args, world):
        resolve_amp(args, world.device, world.log)
        seed_everything(args, world)
        self.data_config = model_data_config(args.model, args.img_size, args.input_size)
        self.loader, self.val_loader = open_loaders(args, world, self.data_config)
        self.loader.start()
        if args.num_classes not in (None, self.loader.num_classes):
            raise Refused(f"error: --num-classes {args.num_classes} but the data has "
                          f"{self.loader.num_classes} classes")
        args.num_classes = self.loader.num_classes
        seed_everything(args, world)  # an untrained teacher's weights: the trainer's draw
        self.task = build_task(args, self.data_config, args.teacher_checkpoint).to(world.device)
        self.task.eval()
        self.autocast, self.device = autocast_settings(args), world.device
        self.embedding = (embedding_width(self.task.teacher.model) if args.distiller == "hcd"
                          else None)

    def outputs(self, view, slots, progress=None):
        """``progress`` (a tqdm bar), if given, counts the images as they are done."""
        self.loader.set_epoch(view, slots=list(slots))
        parts = {"logits": []} if self.embedding is None else {"logits": [], "embedding": []}
        for images, _ in self.loader:
            with torch.no_grad(), self.autocast(self.device.type):
                outputs = self.task.teacher_outputs(images)
            for name, rows in parts.items():  # kept on the device: no sync per batch
                rows.append(getattr(outputs, name).float())
            if progress is not None:
                progress.update(len(images))
        return {name: torch.cat(rows) for name, rows in parts.items()}

    def close(self):
        self.loader.close()
        self.val_loader.close()


def manifest_fields(args, runner):
    """``build.json``: what the rows depend on (``teacher_cache.identity``) and how they are
    kept. Not the number of views: a build with more extends a cache."""
    return {"format": teacher_cache.FORMAT,
            **teacher_cache.identity(args, runner.loader, runner.data_config),
            "dtype": args.cache_dtype, "shard_rows": SHARD_ROWS,
            "embedding": runner.embedding, "num_classes": args.num_classes,
            "versions": {"fastkd": __version__, "torch": torch.__version__,
                         "timm": timm.__version__}}


def build(args, world):
    """Every view's shards of the cache at ``--teacher-cache``, those a killed build finished
    kept; rank 0 writes the manifest once all are there. A finished cache of fewer views is
    extended: its shards are kept, and its manifest serves runs until the new one replaces it."""
    directory = args.teacher_cache
    runner = TeacherRunner(args, world)
    try:
        fields = manifest_fields(args, runner)
        if world.main:
            check_resumable(directory, fields)
        # Measured and checked as a live run's, before anything is written: a run from the
        # cache builds no teacher to measure.
        accuracy = measure_teacher(args, world, runner.task, runner.val_loader, runner.autocast)
        if world.main:
            start(directory, fields)
        world.barrier()
        manifest = os.path.join(directory, MANIFEST)
        built = teacher_cache.read_json(manifest)["views"] if os.path.isfile(manifest) else 0
        if built >= args.epochs:
            world.log(f"{directory} is a finished cache of these settings with {built} views: "
                      "nothing to do")
            return
        if built:
            world.log(f"{directory} holds {built} views: extending it to {args.epochs}")
        size = runner.loader.dataset_size
        shards = [(view, first) for view in range(args.epochs)
                  for first in range(0, size, SHARD_ROWS)]
        mine = [shard for number, shard in enumerate(shards)
                if number % world.world_size == world.rank
                and not teacher_cache.finished_shard(directory, *shard)]
        done = len(shards) - int(world.sum([len(mine)])[0])
        world.log(f"caching {args.teacher}'s outputs: {args.epochs} views x {size} samples in "
                  f"{len(shards)} shards ({done} done before)")
        progress = progress_bar(sum(min(SHARD_ROWS, size - first) for _, first in mine),
                                world.main)
        # Stop signals are agreed on between shards, at the same number of polls on every rank
        # (engine.stop): ranks with fewer shards left poll on.
        rounds = int(world.max([len(mine)])[0])
        for round_ in range(rounds):
            number = world.stop.poll()
            if number:
                raise Stopped(number, 0)
            if round_ < len(mine):
                view, first = mine[round_]
                rows = runner.outputs(view, range(first, min(first + SHARD_ROWS, size)), progress)
                teacher_cache.write_shard(directory, view, first, rows, args.cache_dtype)
        progress.close()
        world.barrier()
        if world.main:
            records = [teacher_cache.finished_shard(directory, *shard) for shard in shards]
            teacher_cache.write_json(manifest, {**fields, "views": args.epochs,
                                                "teacher_accuracy": accuracy,
                                                "shards": records})
            stored = sum(entry["bytes"] for record in records
                         for entry in record["files"].values())
            world.log(f"wrote {directory}: {stored / 2**20:.1f} MiB, "
                      f"{stored / (args.epochs * size):.0f} bytes per image per view")
    finally:
        runner.close()


def check_resumable(directory, fields):
    """A ``build.json`` in ``directory`` must hold ``fields``: a build resumed or extended there
    adds rows computed the same way."""
    path = os.path.join(directory, BUILD)
    if os.path.isfile(path):
        found = teacher_cache.differences(teacher_cache.read_json(path), fields)
        if found:
            raise Refused(f"error: --teacher-cache {directory} holds a cache built with other "
                          f"settings ({'; '.join(found)}): give another folder, or remove "
                          "it to build again")


def start(directory, fields):
    """Begin a build in ``directory`` (its ``build.json``), or go on with the one there."""
    path = os.path.join(directory, BUILD)
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        teacher_cache.write_json(path, fields)


def progress_bar(total, shown):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not shown, file=sys.stdout, mininterval=1.0)


def verify(args, world):
    """Recompute ``VERIFY_SAMPLES`` random entries of the cache at ``--verify`` with the live
    teacher and log the largest differences, relative to the largest value, with a verdict:
    within the rounding of the dtypes the values went through (``HALF_ULP``), or not (a
    CacheError: the cache does not hold what this teacher computes)."""
    runner = TeacherRunner(args, world)
    try:
        cache = TeacherCache(args.verify)
        fields = manifest_fields(args, runner)
        found = teacher_cache.differences(
            cache.manifest, {key: value for key, value in fields.items()
                             if key not in ("dtype", "versions")})
        if found:
            raise CacheError(f"--verify {args.verify} was built for another run "
                             f"({'; '.join(found)})")
        views = cache.manifest["views"]
        cache.open_views(range(views), check=False)
        generator = np.random.default_rng(args.seed)
        picks = generator.integers([views, runner.loader.dataset_size],
                                   size=(VERIFY_SAMPLES, 2))
        largest = {}
        for view in sorted(set(picks[:, 0].tolist())):
            slots = picks[picks[:, 0] == view, 1].tolist()
            cached = cache.rows(view, slots)
            for name, live in runner.outputs(view, slots).items():
                live, stored = live.cpu(), getattr(cached, name).float()
                difference = (stored - live).abs().max().item()
                scale = live.abs().max().item() or 1.0
                previous = largest.get(name, (0.0, 0.0))
                largest[name] = (max(previous[0], difference),
                                 max(previous[1], difference / scale))
        dtypes = sorted({cache.manifest["dtype"], cache.manifest["precision"]},
                        key=HALF_ULP.get)
        tolerance = 4 * HALF_ULP[dtypes[-1]] + 1e-5
        for name, (absolute, relative) in largest.items():
            world.log(f"{args.verify}: {VERIFY_SAMPLES} samples, teacher {name}: largest "
                      f"difference {absolute:.3g} ({relative:.3g} of the largest value), "
                      f"cache {cache.manifest['dtype']}: "
                      + ("within" if relative <= tolerance else "BEYOND")
                      + f" the rounding of {', '.join(dtypes)} ({tolerance:.3g})")
        beyond = [name for name, (_, relative) in largest.items() if relative > tolerance]
        if beyond:
            raise CacheError(f"--verify {args.verify}: the teacher's {', '.join(beyond)} differ "
                             "from the cache's beyond rounding: the cache does not hold what "
                             "this teacher computes on these inputs")
    except CacheError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        runner.close()


def run_and_exit(args):
    """Build or verify in this process's place in the process group, then exit."""
    world = World()
    world.stop.install()
    refused = None
    try:
        (verify if args.verify else build)(args, world)
        status = 0
    except Stopped as stop:
        world.log(f"{stop.name}: exiting; the shards written are kept (run it again to resume)")
        status = 128 + stop.number
    except CacheError as error:
        status = f"error: {error}"
    except Refused as error:  # settings every process refuses alike: said once (below)
        refused, status = error, 1
    except SystemExit as stop:
        status = stop.code
    world.stop.uninstall()
    world.close()
    sys.exit(refusal.exit_status(refused, world.local_rank) if refused else status)
