"""Where every random draw of the input comes from: pure functions of (seed, epoch, position).

Training reads one permutation of the whole dataset per (seed, epoch). Step ``s`` takes the
global batch ``permutation[s * G:(s + 1) * G]`` (G = batch size x processes) and rank ``r`` its
``r``-th slice of ``batch_size``; a last partial global batch is dropped, as timm's training
loader does. Each sample's augmentations (crop box, flip, auto-augment, erasing) are drawn from
generators seeded by (seed, epoch, sample index), and a batch's (mixup pairs and lambda) by
(seed, epoch, step, rank); no draw comes from a worker's own random stream. So:

- a run's place in an epoch is one integer, the steps done, and a resumed run reads and augments
  exactly what the uninterrupted one would have;
- the number of loader workers does not change what is trained, and a run resumed on fewer
  processes with the same global batch continues the same global order;
- the input of any (epoch, sample) can be made again, on its own.

Evaluation reads the sorted list, cut into contiguous shards (every sample exactly once).
"""

import contextlib
import random

import numpy as np
import torch

from .folders import shard_bounds

# Separate streams for separate purposes: the same (seed, epoch, n) must not seed two of them.
_ORDER, _SAMPLE, _BATCH, _ERASE = range(4)


def derive_seed(*keys):
    """A 63-bit seed from non-negative integers ``keys``, by numpy's SeedSequence: well mixed,
    so that neighbouring keys give unrelated streams."""
    state = np.random.SeedSequence([int(key) for key in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_seed(seed, epoch, index):
    """The seed of sample ``index``'s augmentations in ``epoch``."""
    return derive_seed(seed, _SAMPLE, epoch, index)


def erase_seed(seed, epoch, index):
    """The seed of sample ``index``'s random erasing in ``epoch`` where erasing runs apart from
    the other augmentations (on the training device, after DALI or nvJPEG)."""
    return derive_seed(seed, _ERASE, epoch, index)


def batch_seed(seed, epoch, step, rank):
    """The seed of rank ``rank``'s batch-level draws (mixup, cutmix) at ``step`` of ``epoch``."""
    return derive_seed(seed, _BATCH, epoch, step, rank)


def augment_view(epoch, augment_views=None):
    """The view of the augmentations ``epoch`` draws (the ``epoch`` of ``sample_seed`` and
    ``erase_seed``): the epoch itself, or with ``augment_views`` K (``--augment-views``) epoch
    mod K, so that a run of any length sees K views of each sample, in a new order every epoch
    (as FKD reuses its stored crops), and a teacher cache of K views serves it."""
    return epoch % augment_views if augment_views else epoch


def steps_per_epoch(size, batch_size, world_size):
    """Training steps in an epoch of ``size`` samples: full global batches only."""
    return size // (batch_size * world_size)


def train_indices(size, *, seed, epoch, batch_size, rank, world_size, start_step=0):
    """Sample indices rank ``rank`` reads in ``epoch`` from step ``start_step`` on, in order
    (``batch_size`` per step)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch))
    order = torch.randperm(size, generator=generator)
    global_batch = batch_size * world_size
    steps = steps_per_epoch(size, batch_size, world_size)
    batches = order[:steps * global_batch].view(steps, world_size, batch_size)
    return batches[start_step:, rank].reshape(-1).tolist()


def eval_indices(size, rank, world_size):
    """Sample indices rank ``rank`` evaluates: its contiguous shard of the sorted list."""
    return list(range(*shard_bounds(size, rank, world_size)))


@contextlib.contextmanager
def seeded_globals(seed, device=None):
    """Python's, numpy's and torch's global generators (and ``device``'s, if CUDA) seeded with
    ``seed`` inside the block and put back as they were after it: for code that draws from the
    global generators (timm's auto-augment and random erasing, torchvision's transforms, timm's
    Mixup), in a worker or in the training process, whose own streams it must not disturb."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda = device is not None and torch.device(device).type == "cuda"
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if cuda:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)
