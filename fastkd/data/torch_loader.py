"""The torchvision loader: PIL decoding and torchvision transforms on DataLoader workers.

A file that does not decode is replaced by the next readable sample of the split (or, with
``bad_images="error"``, raises). The workers are other processes: each sample carries the files
its worker found bad, the loader collects them (``bad_images``) and the sampler replaces those
samples from then on, so a bad file is decoded about once per run.
"""

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms

from ..signals import blocked_for_children, obey_parent_only
from .augment import compose_transform
from .bad_images import (
    DECODE_ERRORS,
    BadImageError,
    bad_file_error,
    check_mode,
    describe,
    read_rgb,
    record_bad,
    wrap_from,
)
from .common import eval_resize, to_device
from .crop_flip import CropFlip
from .order import (
    augment_view,
    eval_indices,
    sample_seed,
    seeded_globals,
    steps_per_epoch,
    train_indices,
)


def image_transform(training, image_size, mean, std, crop_ratio, auto_augment=None,
                    random_erasing=None, crop_flip=CropFlip()):
    """timm/ImageNet convention: random-resized-crop + flip (``crop_flip``) for training; resize
    the shorter side to image_size / crop_ratio and centre-crop for evaluation. ``auto_augment``
    (timm's PIL policy) and ``random_erasing`` (timm's, on the normalised tensor) are the
    training split's (see ``augment.compose_transform``)."""
    if training:
        steps = [transforms.RandomResizedCrop(image_size, scale=crop_flip.scale,
                                              ratio=crop_flip.ratio),
                 transforms.RandomHorizontalFlip(crop_flip.hflip)]
    else:
        steps = [transforms.Resize(eval_resize(image_size, crop_ratio)),
                 transforms.CenterCrop(image_size)]
    return compose_transform(steps, mean, std, auto_augment, random_erasing)


class FileDataset(Dataset):
    """(path, label) samples read with PIL as RGB. Item ``index`` is ``(image, label, bad)``,
    ``bad`` being {path: reason} of the files found bad while reading it. A file that does not
    decode raises ``BadImageError`` naming it with ``bad_images="error"``; with ``"skip"`` the
    next sample in file order (wrapping) that decodes takes its place, with its own label."""

    def __init__(self, samples, transform, bad_images="skip"):
        check_mode(bad_images)
        self.samples, self.transform, self.mode = samples, transform, bad_images
        self.failed = {}  # files this process (a worker) found bad: not decoded again

    def __len__(self):
        return len(self.samples)

    def read(self, path):
        """The file at ``path`` as the items carry it; one of ``DECODE_ERRORS`` if it is bad."""
        return read_rgb(path)

    def first_readable(self, index):
        """``(data, label, bad, read)``: ``read`` (from ``self.read``) of sample ``index``, or
        of the next sample in file order (wrapping) that reads, with that sample's label; ``bad``
        the files found bad on the way and ``read`` the index of the sample read. With
        ``bad_images="error"`` a bad file raises ``BadImageError`` naming it."""
        found = {}
        for candidate in wrap_from(index, len(self.samples)):
            path, label = self.samples[candidate]
            if path in self.failed:
                continue
            try:
                return self.read(path), label, found, candidate
            except DECODE_ERRORS as error:
                if self.mode == "error":
                    raise bad_file_error(path, error) from error
                self.failed[path] = found[path] = describe(error)
        raise BadImageError(f"none of the {len(self.samples)} files of this split decodes")

    def __getitem__(self, index):
        image, label, found, _ = self.first_readable(index)
        return self.transform(image), label, found


def collate_samples(batch):
    """``(images, labels, bad)`` from ``(image, label)`` samples or FileDataset's
    ``(image, label, bad)``: their bad files merged into one dict (empty for datasets without
    files)."""
    images, labels, *found = zip(*batch)
    bad = {}
    for sample_bad in found[0] if found else ():
        bad.update(sample_bad)
    return default_collate(images), default_collate(labels), bad


class EpochSampler(Sampler):
    """This rank's samples of one epoch as keys ``(view, slot, start)``: ``slot`` the sample
    index the epoch's plan puts there (``order.train_indices`` from ``start_step`` for training,
    ``order.eval_indices`` for evaluation, or the ``slots`` given to ``set_epoch``), which with
    ``view`` (``order.augment_view`` of the epoch) seeds its augmentations; ``start`` the index
    to read, ``slot`` or, if that file is in ``bad``, the next index in file order that is not
    (as FileDataset would replace it)."""

    def __init__(self, size, *, rank, world_size, batch_size, training, seed,
                 augment_views=None):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.batch_size, self.training, self.seed = batch_size, training, seed
        self.augment_views = augment_views
        self.epoch = self.view = self.start_step = 0
        self.chosen = None  # the slots set_epoch was given
        self.bad = set()
        self.idle = False  # an empty pass (TorchLoader.start)

    def set_epoch(self, epoch, start_step=0, slots=None):
        self.epoch, self.start_step, self.chosen = epoch, start_step, slots
        self.view = augment_view(epoch, self.augment_views)

    def slots(self):
        """The sample indices this rank reads in the epoch, in order."""
        if self.chosen is not None:
            return list(self.chosen)
        if self.training:
            return train_indices(self.size, seed=self.seed, epoch=self.epoch,
                                 batch_size=self.batch_size, rank=self.rank,
                                 world_size=self.world_size, start_step=self.start_step)
        return eval_indices(self.size, self.rank, self.world_size)

    def __iter__(self):
        for slot in self.slots() if not self.idle else ():
            start = slot
            if slot in self.bad:  # all bad: keep slot, for FileDataset to say so
                start = next((other for other in wrap_from(slot, self.size)
                              if other not in self.bad), slot)
            yield self.view, slot, start

    def __len__(self):
        if self.chosen is not None:
            return len(self.chosen)
        if self.training:
            steps = steps_per_epoch(self.size, self.batch_size, self.world_size)
            return max(steps - self.start_step, 0) * self.batch_size
        return len(eval_indices(self.size, self.rank, self.world_size))


class SeededItems(Dataset):
    """``dataset`` read by ``EpochSampler``'s keys: item ``(view, slot, start)`` is
    ``dataset[start]`` made with the global generators seeded by ``order.sample_seed(seed,
    view, slot)``, so that every random draw of its transforms (torchvision's crop and flip,
    timm's auto-augment and erasing) depends on the sample and the epoch, not on the worker
    that makes it or on what that worker made before."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        view, slot, start = key
        with seeded_globals(sample_seed(self.seed, view, slot)):
            return self.dataset[start]


class TorchLoader:
    """Batches ``(images [B, 3, H, W] float, labels [B] int64)`` on ``device``: for training
    ``batch_size`` samples a step of this rank's share of each global batch (``order``), for
    evaluation its shard of the sorted samples.

    ``set_epoch(epoch, start_step=0, slots=None)``: the epoch the next iteration reads, from step
    ``start_step`` (a resumed run's place), or only the sample indices ``slots`` in that order
    with that epoch's augmentations (the teacher cache's builder); ``len()`` counts the whole
    epoch's batches. ``augment_views``: see ``order.augment_view``.

    ``bad_images`` ({path: reason}): this split's files known bad in this process, those found
    before the run (``known_bad``, already left out of ``dataset``) and those met while reading,
    each logged once when it arrives. ``exclude(bad)`` adds files other ranks found, unlogged.
    Known-bad samples of ``dataset`` are replaced by the sampler without being read again.
    """

    def __init__(self, dataset, num_classes, *, training, batch_size, rank=0, world_size=1,
                 device="cpu", workers=4, channels_last=False, seed=0, known_bad=None,
                 augment_views=None):
        self.dataset, self.num_classes, self.dataset_size = dataset, num_classes, len(dataset)
        self.training, self.batch_size = training, batch_size
        self.device, self.channels_last = torch.device(device), channels_last
        self.sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size,
                                    batch_size=batch_size, training=training, seed=seed,
                                    augment_views=augment_views)
        self.loader = self.data_loader(SeededItems(dataset, seed), collate_samples, workers,
                                       pin_memory=self.device.type == "cuda")
        self.bad_images = {}
        record_bad(self.bad_images, known_bad or {}, log=True)

    def data_loader(self, items, collate, workers, pin_memory):
        """The DataLoader over ``items`` in ``self.sampler``'s order. Its own generator: making
        its iterator draws a seed, which must not come from the training process's stream."""
        return DataLoader(items, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                          persistent_workers=workers > 0, drop_last=False,
                          generator=torch.Generator(), worker_init_fn=obey_parent_only)

    def exclude(self, bad):
        """Replace the samples of the files in ``bad`` ({path: reason}, found by other ranks)
        without reading them."""
        self._add_bad(bad, log=False)

    def _add_bad(self, bad, log):
        new = record_bad(self.bad_images, bad, log)
        if new:  # in-memory datasets (CIFAR-100) have no files, hence no bad ones
            self.sampler.bad.update(index for index, (path, _) in
                                    enumerate(getattr(self.dataset, "samples", ()))
                                    if path in new)

    def set_epoch(self, epoch, start_step=0, slots=None):
        self.sampler.set_epoch(epoch, start_step, slots)

    def __len__(self):
        if self.training and self.sampler.chosen is None:
            return steps_per_epoch(self.dataset_size, self.batch_size, self.sampler.world_size)
        return math.ceil(len(self.sampler) / self.batch_size)

    def batches(self):
        """The DataLoader's batches; its worker processes, started by the first, take stop
        signals from this process only (``signals.blocked_for_children``)."""
        with blocked_for_children():
            iterator = iter(self.loader)
        yield from iterator

    def __iter__(self):
        for images, labels, bad in self.batches():
            if bad:
                self._add_bad(bad, log=True)
            yield to_device(images, labels, self.device, self.channels_last)

    def start(self):
        """Start the worker processes now (a DataLoader starts them at its first iteration;
        persistent, they serve every later one). The trainer starts them before its first
        collective: a fork while a gloo thread finishes one can leave the child waiting forever
        on an interpreter lock that thread held (seen with CPython 3.11), and during training a
        stop vote is in flight at every step (``engine.stop``)."""
        if self.loader.num_workers and self.loader._iterator is None:
            self.sampler.idle = True  # no batch read ahead now: it would be thrown away
            try:
                with blocked_for_children():
                    iter(self.loader)
            finally:
                self.sampler.idle = False

    def close(self):
        """Stop the worker processes now. Persistent workers otherwise stop when their iterator is
        garbage-collected, which a reference cycle can put off to interpreter shutdown; by then
        multiprocessing has closed the queues that tell them to stop, and each is joined only
        after a 5 s time-out (pytorch/pytorch#48666, #81794): a finished run took 22 s to exit
        with 2 workers. DataLoader has no public call for this."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()
