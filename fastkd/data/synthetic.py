"""Synthetic data (``--dataset synthetic``), as in timm's benchmark script: the trainer's own
ceiling, with no input pipeline.

One batch of random images (standard normal, like normalised pixels) and random labels is made
on the training device once; every step reads it again (the last batch of an epoch a slice of
it). Each epoch is ``samples`` samples across ranks, sharded as the file loaders shard; the
validation split is one batch per rank.
"""

import math

import torch

from .folders import shard_bounds


class SyntheticLoader:
    """Batches ``(images [B, 3, S, S] float, labels [B] int64)`` on ``device``, made once."""

    bad_images = {}  # no files, so none bad

    def __init__(self, num_classes, samples, *, batch_size, image_size, rank=0, world_size=1,
                 device="cpu", channels_last=False, seed=0):
        self.num_classes, self.dataset_size, self.batch_size = num_classes, samples, batch_size
        start, stop = shard_bounds(samples, rank, world_size)
        self.shard = stop - start
        generator = torch.Generator(device=device).manual_seed(seed + rank)
        batch = min(batch_size, self.shard)
        self.images = torch.randn(batch, 3, image_size, image_size, device=device,
                                  generator=generator)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch,), device=device, generator=generator)

    def exclude(self, bad):
        pass

    def set_epoch(self, epoch):
        pass

    def close(self):
        pass

    def __len__(self):
        return math.ceil(self.shard / self.batch_size)

    def __iter__(self):
        for start in range(0, self.shard, self.batch_size):
            size = min(self.batch_size, self.shard - start)
            yield self.images[:size], self.labels[:size]


def synthetic_loaders(num_classes, samples, *, batch_size, eval_batch_size=None, world_size=1,
                      **common):
    """``(train_loader, val_loader)``: ``samples`` per training epoch, one evaluation batch per
    rank."""
    if not num_classes or num_classes < 2:
        raise ValueError(f"synthetic data needs num_classes of 2 or more, got {num_classes}")
    if samples < world_size:
        raise ValueError(f"synthetic data needs at least one sample per rank: samples={samples}, "
                         f"world_size={world_size}")
    eval_batch_size = eval_batch_size or batch_size
    return (SyntheticLoader(num_classes, samples, batch_size=batch_size, world_size=world_size,
                            **common),
            SyntheticLoader(num_classes, eval_batch_size * world_size, batch_size=eval_batch_size,
                            world_size=world_size, **common))
