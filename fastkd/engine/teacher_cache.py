"""The teacher-output cache: each training sample's full teacher outputs for V views, stored so
that a run reads them instead of running the teacher (``--teacher-cache DIR``).

A view is the augmentations one training epoch draws: every draw is a function of (seed, epoch,
sample index) (``data.order``), so view v of sample i is what epoch v (or, with
``--augment-views``, any epoch e with e mod K = v) feeds the teacher for it, and the cached row
is the teacher's output for exactly that input.

Layout of DIR (``train/cache_teacher.py`` writes it):

- ``build.json``: what the cache is made from (``identity``), written before any shard: a build
  resumed with other settings is refused, field by field.
- ``view-<v>/logits-<first>.npy`` ``[n, C]`` and, for HCD, ``view-<v>/embedding-<first>.npy``
  ``[n, d_t]``: the rows of samples first .. first + n - 1, in the cache's dtype (bfloat16 kept
  as its 16 bits in int16: numpy has no bfloat16); ``view-<v>/<first>.json``, written after
  them, their sizes and sha256: a shard is done once its record exists.
- ``manifest.json``: ``build.json``'s fields plus every shard's record, written last: a cache
  without it is unfinished.

Why numpy's ``.npy``: ``np.load(mmap_mode="r")`` maps a file with no copy and no dependency
beyond numpy, its header gives shape and dtype (a truncated file is seen at open), and a step's
rows are one fancy-indexing gather per shard. Every file is written whole or not at all
(``files.atomic_write``).
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..data.order import augment_view, train_indices
from ..distillers.base import TeacherOutputs
from ..files import atomic_write
from .refusal import Refused

MANIFEST, BUILD = "manifest.json", "build.json"
FORMAT = 1
CACHE_DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.int16, torch.bfloat16),
                "float32": (np.float32, torch.float32)}
# Rows per shard: ImageNet-1k logits at float16 make 8 MB shards (a resumed build redoes at most
# one per process), and a step's random rows touch at most batch-size shards.
SHARD_ROWS = 4096


class CacheError(ValueError):
    """A cache that cannot serve: its message names the file or the manifest field."""


def sha256_of(path, block=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(samples, root):
    """sha256 over each sample's path (relative to ``root``), label, size and mtime: a dataset
    whose files or classes changed since the cache was built does not match."""
    digest = hashlib.sha256()
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\t{label}\t{stat.st_size}\t"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def differences(cached, wanted, prefix=""):
    """``["field: cache X, this run Y", ...]`` for the fields of ``wanted`` whose value in
    ``cached`` differs (nested fields as ``data.fingerprint``)."""
    found = []
    for key, value in wanted.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(cached.get(key), dict):
            found += differences(cached[key], value, f"{name}.")
        elif cached.get(key) != value:
            found.append(f"{name}: cache {json.dumps(cached.get(key))}, this run "
                         f"{json.dumps(value)}")
    return found


def write_json(path, value):
    with atomic_write(path) as handle:
        json.dump(value, handle, indent=1)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def shard_record_path(directory, view, first):
    return os.path.join(directory, f"view-{view}", f"{first}.json")


def write_shard(directory, view, first, arrays, dtype):
    """Write the rows of samples ``first`` on (``arrays``: ``{"logits": [n, C], ...}`` float
    tensors on any device) as view ``view``'s shard; returns its record. NaN is refused: a cache
    never holds what a live teacher's NaN would have stopped."""
    folder = os.path.join(directory, f"view-{view}")
    os.makedirs(folder, exist_ok=True)
    _, torch_dtype = CACHE_DTYPES[dtype]
    record = {"view": view, "first": first, "files": {}}
    for name, rows in arrays.items():
        if torch.isnan(rows).any():
            bad = first + int(torch.isnan(rows).any(dim=1).nonzero()[0])
            raise CacheError(f"the teacher's {name} for sample {bad} (view {view}) are NaN: "
                             "nothing is cached")
        values = rows.detach().to("cpu", torch_dtype)
        array = values.view(torch.int16).numpy() if dtype == "bfloat16" else values.numpy()
        path = os.path.join(folder, f"{name}-{first}.npy")
        with atomic_write(path, "wb") as handle:
            np.save(handle, array)
        record["rows"] = len(array)
        record["files"][name] = {"file": os.path.relpath(path, directory),
                                 "bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    write_json(shard_record_path(directory, view, first), record)
    return record


def finished_shard(directory, view, first):
    """The record of a shard a build finished (its files present at their recorded sizes), or
    None."""
    path = shard_record_path(directory, view, first)
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    for entry in record["files"].values():
        file = os.path.join(directory, entry["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"]:
            return None
    return record


class TeacherCache:
    """A finished cache, opened for reading: ``manifest`` (``manifest.json``) and, per view,
    per shard, its arrays mapped (``open_views``)."""

    def __init__(self, directory):
        self.directory = directory
        path = os.path.join(directory, MANIFEST)
        if not os.path.isdir(directory):
            raise CacheError(f"--teacher-cache {directory} does not exist: build it with "
                             "train/cache_teacher.py")
        if not os.path.isfile(path):
            raise CacheError(f"--teacher-cache {directory} is not a finished teacher cache (no "
                             f"{MANIFEST}): run train/cache_teacher.py again to finish it")
        self.manifest = read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise CacheError(f"--teacher-cache {directory}: {path} is not a fastkd teacher cache's "
                             f"manifest of format {FORMAT}: build the cache again")
        self.shard_rows = self.manifest["shard_rows"]
        self.shards = {}  # {view: [{"logits": memmap, "embedding": memmap}, ...]}

    def open_views(self, views, check=True):
        """Map the shards of ``views``; with ``check``, first each file's size, sha256 and NaN
        (read once, before any training; a mismatch names the file)."""
        numpy_dtype, torch_dtype = CACHE_DTYPES[self.manifest["dtype"]]
        for view in views:
            shards = []
            for record in (entry for entry in self.manifest["shards"] if entry["view"] == view):
                arrays = {}
                for name, entry in record["files"].items():
                    path = os.path.join(self.directory, entry["file"])
                    if check:
                        self._check_file(path, entry)
                    try:
                        array = np.load(path, mmap_mode="r")
                    except (OSError, ValueError) as error:
                        raise CacheError(f"{path} does not read as a .npy file ({error}): "
                                         "build the cache again") from None
                    if array.dtype != numpy_dtype or len(array) != record["rows"]:
                        raise CacheError(f"{path} holds {array.shape} {array.dtype}, the manifest "
                                         f"says {record['rows']} rows of {self.manifest['dtype']}")
                    # A copy: torch takes no read-only (mapped) array without a warning.
                    if check and torch.from_numpy(np.array(array)).view(torch_dtype).isnan().any():
                        raise CacheError(f"{path} holds NaN: build the cache again")
                    arrays[name] = array
                shards.append((record["first"], arrays))
            shards.sort(key=lambda shard: shard[0])
            self.shards[view] = shards

    @staticmethod
    def _check_file(path, entry):
        if not os.path.isfile(path):
            raise CacheError(f"{path} is missing: build the cache again")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise CacheError(f"{path} is {size} bytes, the manifest says {entry['bytes']} "
                             "(truncated or replaced): build the cache again")
        if sha256_of(path) != entry["sha256"]:
            raise CacheError(f"{path} does not match its sha256 in the manifest (corrupt): build "
                             "the cache again")

    def rows(self, view, slots):
        """``TeacherOutputs`` of samples ``slots`` (a sequence of indices) in view ``view``, as
        CPU tensors in the cache's dtype."""
        slots = np.asarray(slots, dtype=np.int64)
        shard_of, offset = np.divmod(slots, self.shard_rows)
        gathered = {}
        for index in np.unique(shard_of):
            first, arrays = self.shards[view][index]
            where = shard_of == index
            for name, array in arrays.items():
                if name not in gathered:
                    gathered[name] = np.empty((len(slots), array.shape[1]), array.dtype)
                gathered[name][where] = array[offset[where]]
        _, torch_dtype = CACHE_DTYPES[self.manifest["dtype"]]
        tensors = {name: torch.from_numpy(array).view(torch_dtype)
                   for name, array in gathered.items()}
        return TeacherOutputs(tensors["logits"], tensors.get("embedding"))


# -- what a cache is made from, and a run's use of it -------------------------------------------
def teacher_weights(args):
    """The teacher's weights as a manifest names them: its checkpoint file's sha256, timm's
    pretrained weights, or the random initialisation of the run's seed."""
    if args.teacher_checkpoint:
        return f"checkpoint sha256 {sha256_of(args.teacher_checkpoint)}"
    if args.teacher_pretrained:
        return "timm pretrained"
    return f"untrained, seed {args.seed}"


def loader_samples(loader):
    """The training loader's ``(path, label)`` samples (in-memory datasets: None)."""
    return getattr(loader, "samples", None) or getattr(getattr(loader, "dataset", None),
                                                        "samples", None)


def identity(args, train_loader, data_config):
    """What a cache's rows depend on, from a run's (or a build's) settings: the teacher and its
    weights, the input it is fed, the data, the loader (DALI and torchvision decode and resize
    differently), the autocast precision and every augmentation setting with the seed. A run
    reads a cache only if all agree."""
    samples = loader_samples(train_loader)
    if samples:
        data = fingerprint(samples, os.path.commonpath([path for path, _ in samples]))
    else:  # CIFAR-100's arrays: the archive's files
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(args.data_dir)
                       for name in names)
        data = fingerprint([(path, 0) for path in files], args.data_dir)
    return {
        "teacher": {"name": args.teacher, "kwargs": args.teacher_kwargs,
                    "weights": teacher_weights(args)},
        "input": {"size": data_config["input_size"][-1], "mean": list(data_config["mean"]),
                  "std": list(data_config["std"])},
        "data": {"dataset": args.dataset, "samples": train_loader.dataset_size,
                 "classes": train_loader.num_classes, "fingerprint": data},
        "loader": args.loader,
        # The teacher runs under the run's autocast (as resolve_amp settled it).
        "precision": args.amp_dtype if args.amp else "float32",
        "augmentation": {"seed": args.seed, "scale": list(args.scale), "ratio": list(args.ratio),
                         "hflip": args.hflip, "aa": args.aa, "reprob": args.reprob,
                         "remode": args.remode, "recount": args.recount},
    }


def views_needed(args):
    """The views a run reads: one per epoch, or its ``--augment-views``."""
    return args.augment_views or args.epochs


def open_for_run(args, world, train_loader, data_config):
    """The run's ``CachedTeacher``, once the cache at ``--teacher-cache`` is known to hold what
    this run's teacher would compute: every refusal names the manifest field (cache's value and
    the run's) or the file, before any model is built."""
    directory = args.teacher_cache
    try:
        cache = TeacherCache(directory)
        manifest = cache.manifest
        found = differences(manifest, identity(args, train_loader, data_config))
        if found:
            raise CacheError(f"--teacher-cache {directory} was built for another run ("
                             f"{'; '.join(found)}): build one with this run's flags")
        views = views_needed(args)
        if manifest["views"] < views:
            raise CacheError(
                f"--teacher-cache {directory} holds {manifest['views']} views (manifest field "
                f"'views'), one per epoch, and this run needs {views}: extend it "
                f"(train/cache_teacher.py --teacher-cache {directory} --epochs {views}, with "
                "this run's flags)"
                + ("" if args.augment_views else
                   f", or reuse them with --augment-views {manifest['views']}"))
        if args.distiller == "hcd" and not manifest["embedding"]:
            raise CacheError(f"--teacher-cache {directory} holds no teacher embedding (manifest "
                             "field 'embedding'), which HCD fuses: build it with --distiller hcd")
        world.log(f"teacher outputs from {directory}: {manifest['views']} views of "
                  f"{manifest['data']['samples']} samples, {manifest['dtype']}; checking "
                  f"{views} views' files")
        cache.open_views(range(views))
    except CacheError as error:
        raise Refused(f"error: {error}") from None
    return CachedTeacher(cache, args, world, train_loader.dataset_size)


class CachedTeacher:
    """The teacher's outputs for each step of a run, read from ``cache``: the step's samples are
    those ``order.train_indices`` plans for this rank (the loaders read the same), in the view
    ``order.augment_view`` gives the epoch. The next step's rows are gathered on a thread while
    this one trains (the memory map's reads release the GIL) and, for a CUDA device, pinned and
    copied without blocking."""

    def __init__(self, cache, args, world, dataset_size):
        self.cache, self.world, self.dataset_size = cache, world, dataset_size
        self.seed, self.batch_size, self.augment_views = (args.seed, args.batch_size,
                                                          args.augment_views)
        self.embedding_width = cache.manifest["embedding"]
        self.pin = world.device.type == "cuda"

    def _read(self, view, slots):
        outputs = self.cache.rows(view, slots)
        return TeacherOutputs(*(None if part is None else part.pin_memory() if self.pin
                                else part for part in outputs))

    def epoch(self, epoch, start_step=0):
        """``TeacherOutputs`` on the device, one per step of ``epoch`` from ``start_step``."""
        view = augment_view(epoch, self.augment_views)
        world = self.world
        slots = train_indices(self.dataset_size, seed=self.seed, epoch=epoch,
                              batch_size=self.batch_size, rank=world.rank,
                              world_size=world.world_size, start_step=start_step)
        steps = [slots[first:first + self.batch_size]
                 for first in range(0, len(slots), self.batch_size)]
        with ThreadPoolExecutor(1, thread_name_prefix="fastkd-teacher-cache") as reader:
            pending = reader.submit(self._read, view, steps[0]) if steps else None
            for step in range(len(steps)):
                outputs = pending.result()
                if step + 1 < len(steps):
                    pending = reader.submit(self._read, view, steps[step + 1])
                yield TeacherOutputs(*(None if part is None else
                                       part.to(world.device, non_blocking=True)
                                       for part in outputs))
