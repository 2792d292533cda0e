"""Synthetic data (``--dataset synthetic``), as in timm's benchmark script: the trainer's own
ceiling, with no input pipeline.

One batch of random images (standard normal, like normalised pixels) and random labels is made
on the training device once; every step reads it again. A training epoch takes as many steps as
the file loaders would for ``samples`` samples (full global batches, ``order.steps_per_epoch``);
the validation split is one batch per rank.
"""

import torch

from .order import steps_per_epoch


class SyntheticLoader:
    """Batches ``(images [B, 3, S, S] float, labels [B] int64)`` on ``device``, made once."""

    bad_images = {}  # no files, so none bad

    def __init__(self, num_classes, samples, *, batch_size, image_size, rank=0, world_size=1,
                 device="cpu", channels_last=False, seed=0):
        self.num_classes, self.dataset_size, self.batch_size = num_classes, samples, batch_size
        self.steps = steps_per_epoch(samples, batch_size, world_size)
        self.start_step = 0
        generator = torch.Generator(device=device).manual_seed(seed + rank)
        self.images = torch.randn(batch_size, 3, image_size, image_size, device=device,
                                  generator=generator)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), device=device,
                                    generator=generator)

    def exclude(self, bad):
        pass

    def set_epoch(self, epoch, start_step=0, slots=None):
        if slots is not None:
            raise ValueError("synthetic data has no samples to choose: it repeats one batch")
        self.start_step = start_step

    def start(self):
        """Nothing to start: no worker processes (see ``TorchLoader.start``)."""

    def close(self):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.start_step, self.steps):
            yield self.images, self.labels


def synthetic_loaders(num_classes, samples, *, batch_size, eval_batch_size=None, world_size=1,
                      **common):
    """``(train_loader, val_loader)``: ``samples`` per training epoch, one evaluation batch per
    rank."""
    if not num_classes or num_classes < 2:
        raise ValueError(f"synthetic data needs num_classes of 2 or more, got {num_classes}")
    if samples < batch_size * world_size:
        raise ValueError(f"synthetic data needs at least one global batch: samples={samples}, "
                         f"batch_size={batch_size} x world_size={world_size}")
    eval_batch_size = eval_batch_size or batch_size
    return (SyntheticLoader(num_classes, samples, batch_size=batch_size, world_size=world_size,
                            **common),
            SyntheticLoader(num_classes, eval_batch_size * world_size, batch_size=eval_batch_size,
                            world_size=world_size, **common))
