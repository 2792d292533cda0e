"""The DALI loader: JPEG decoding and augmentation in DALI, on the GPU when there is one.

With CUDA, decoding is ``device="mixed"`` (nvJPEG) and the augmentations run on
``device_id=local_rank``; without CUDA the same pipeline runs CPU-only (``device_id=None``).
Each epoch's pipeline reads this rank's samples in the order ``order`` plans (training: its share
of each global batch, from the step a resumed run starts at; evaluation: its shard of the sorted
list) with ``fn.readers.file``; the iterator drops the padding of a last partial batch.

Every random draw is a sample's own (``order.sample_seed``), made on the host and fed to the
pipeline through ``fn.external_source`` beside the reader, batch for batch: the crop window
(``augment.crop_params`` on the file's size, read from its header) decoded alone (ROI decoding),
the flip, and the auto-augment policy's choices (which sub-policy, whether each of its stages
runs, the signs of the magnitudes), applied with DALI's ``auto_aug.core.select``; random erasing
runs on each batch on the training device, per sample (``augment.erase_samples``). So a resumed
run, another worker count or another thread schedule sees the same augmentations.

Pixels are decoded as stored, as the torchvision and nvJPEG loaders read them: DALI's decoders
would turn a file by its EXIF orientation tag (``adjust_orientation``, on by default), where the
others do not, and the window drawn on the stored size would miss the turned image.

DALI cannot skip a file inside its pipeline, so ``samples`` must hold only files that decode:
``create_loaders`` decodes each once beforehand (``verify.py``) and leaves the bad ones out.

Of timm's auto-augment strings DALI implements those listed in ``DALI_AUTO_AUGMENT``
(``dali_auto_augment`` refuses the others), with DALI's own operators on the uint8 crop.
"""

import math

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import augmentations, auto_augment
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from ..signals import blocked_for_children
from .augment import crop_params, erase_samples, flip_drawn
from .bad_images import record_bad
from .common import eval_resize, to_device
from .crop_flip import CropFlip
from .order import (
    augment_view,
    erase_seed,
    eval_indices,
    sample_seed,
    steps_per_epoch,
    train_indices,
)

READER = "reader"
# timm auto-augment strings with an exact DALI equal -> arguments of DALI's ``auto_augment``.
# timm's "v0" (the TPU EfficientNet ImageNet policy) has the sub-policies, probabilities and
# magnitude scale (11 levels, the same ranges; translations relative, up to 45% of the side) of
# DALI's "image_net" policy; DALI's operators differ in detail (e.g. posterize keeps at least one
# bit, equalize follows OpenCV). Nothing else matches: timm's "original" is the paper's table, not
# DALI's; magnitude noise (mstd) exists only in timm; timm's RandAugment applies each op with
# probability 0.5 and has Invert and SolarizeAdd where DALI's has Identity; timm has no
# TrivialAugment, DALI no AugMix.
DALI_AUTO_AUGMENT = {"v0": dict(policy_name="image_net", max_translate_rel=0.45)}


def dali_auto_augment(config):
    """DALI ``auto_augment`` arguments for timm's auto-augment string ``config`` (None for
    none); ValueError for a policy DALI does not implement."""
    if not config:
        return None
    if config not in DALI_AUTO_AUGMENT:
        raise ValueError(
            f"auto_augment (--aa) {config!r}: DALI has no such policy (of timm's auto-augment "
            f"strings it implements only {', '.join(map(repr, DALI_AUTO_AUGMENT))}); "
            "--loader torch runs timm's")
    return DALI_AUTO_AUGMENT[config]


def image_net_policy():
    """DALI's "image_net" policy (timm's "v0") with translations relative to the image side."""
    return auto_augment.get_image_net_policy(
        use_shape=True, max_translate_rel=DALI_AUTO_AUGMENT["v0"]["max_translate_rel"])


class PolicyDraws:
    """A sample's auto-augment choices, drawn on the host: for each stage of the longest
    sub-policy, the operation to run (an index into ``operations``; 0, the identity, where the
    chosen sub-policy's stage does not run or does not exist), its magnitude bin and its sign.
    The sub-policy is uniform, a stage runs with its probability, the sign is + or - with even
    odds: the distribution of DALI's own ``apply_auto_augment``."""

    def __init__(self, policy):
        self.policy = policy
        self.operations = [augmentations.identity, *policy.augmentations.values()]
        self.stages = max(len(sub_policy) for sub_policy in policy.sub_policies)

    def draw(self, generator):
        """``(operation, magnitude, sign)``: three int32 arrays of ``self.stages``."""
        draws = np.zeros((3, self.stages), dtype=np.int32)
        chosen = int(torch.randint(len(self.policy.sub_policies), (1,), generator=generator))
        runs = torch.rand(self.stages, generator=generator).tolist()
        signs = torch.rand(self.stages, generator=generator).tolist()
        for stage, (operation, probability, magnitude) in enumerate(
                self.policy.sub_policies[chosen]):
            if runs[stage] < probability:
                draws[:, stage] = (self.operations.index(operation), magnitude or 0,
                                   signs[stage] < 0.5)
        return draws


def apply_policy(images, choices, policy, image_size, fill_value):
    """The drawn operations of each stage (``choices``: the external source's per-sample
    ``PolicyDraws.draw``), one ``select`` per stage."""
    for stage in range(policy.stages):
        magnitude = signed_bin(choices[1, stage], random_sign=choices[2, stage])
        images = select(policy.operations, choices[0, stage], images, magnitude_bin=magnitude,
                        num_magnitude_bins=policy.policy.num_magnitude_bins,
                        shape=(image_size, image_size), fill_value=fill_value,
                        interp_type=types.INTERP_LINEAR)
    return images


@pipeline_def(enable_conditionals=True)  # select splits the batch by operation
def image_pipeline(files, labels, training, image_size, resize_size, mean, std, gpu,
                   draws, policy):
    """``draws``: the training batches' per-sample crop windows, flips and policy choices in the
    reader's order (``SampleDraws``); ``policy``: a ``PolicyDraws`` or None."""
    jpegs, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                    pad_last_batch=True, name=READER)
    decode_device = "mixed" if gpu else "cpu"
    mirror = False
    if training:
        anchor, shape, mirror, *choices = fn.external_source(
            source=draws, num_outputs=3 if policy is None else 4, batch=True, batch_info=True)
        images = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device,
                                         output_type=types.RGB, adjust_orientation=False,
                                         normalized_anchor=False, normalized_shape=False,
                                         axis_names="WH")
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        if policy is not None:
            # timm's order: crop, flip, policy. Where timm fills with the mean colour, DALI
            # takes one grey level: the average of that colour's channels.
            images = fn.flip(images, horizontal=mirror)
            images = apply_policy(images, choices[0], policy, image_size,
                                  round(255 * sum(mean) / 3))
            mirror = False
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB,
                                   adjust_orientation=False)
        images = fn.resize(images, resize_shorter=resize_size)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(image_size, image_size),
        mean=[255 * value for value in mean], std=[255 * value for value in std], mirror=mirror)
    return images, labels


class SampleDraws:
    """The training pipeline's external source: batch ``batch_info.iteration``'s per-sample crop
    anchors and shapes ([x, y] and [w, h] in pixels), mirror flags and, with a ``PolicyDraws``
    ``policy``, auto-augment choices, each from its sample's generator: crop, then flip, then the
    policy's. ``files`` and ``slots`` in the reader's order; ``sizes``: the loader's array of
    each sample's (width, height), 0 until read. It holds nothing of the loader: a pipeline that
    referred back to its loader would live on in a reference cycle, its threads with it, until
    the garbage collector ran."""

    def __init__(self, files, slots, sizes, *, seed, epoch, batch_size, crop_flip, policy):
        self.files, self.slots, self.sizes = files, slots, sizes
        self.seed, self.epoch, self.batch_size = seed, epoch, batch_size
        self.crop_flip, self.policy = crop_flip, policy

    def __call__(self, batch_info):
        first = batch_info.iteration * self.batch_size
        positions = list(range(first, min(first + self.batch_size, len(self.slots))))
        if not positions:
            raise StopIteration
        # A short last batch (chosen slots): the reader pads it with its last sample, and so
        # must the draws; the iterator drops the padding.
        positions += positions[-1:] * (self.batch_size - len(positions))
        anchors, shapes, mirrors, choices = [], [], [], []
        for position in positions:
            slot = self.slots[position]
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, slot))
            width, height = self.size(position)
            top, left, crop_height, crop_width = crop_params(height, width, generator,
                                                             self.crop_flip)
            anchors.append(np.array([left, top], dtype=np.float32))
            shapes.append(np.array([crop_width, crop_height], dtype=np.float32))
            mirrors.append(np.array(flip_drawn(generator, self.crop_flip), dtype=np.int32))
            if self.policy:
                choices.append(self.policy.draw(generator))
        return (anchors, shapes, mirrors, choices) if self.policy else (anchors, shapes, mirrors)

    def size(self, position):
        """The ``(width, height)`` of the file at ``position`` as stored, EXIF orientation not
        applied (PIL reads the header alone; the decoders here leave the orientation as stored,
        as the torchvision and nvJPEG loaders do)."""
        slot = self.slots[position]
        if not self.sizes[slot, 0]:
            with Image.open(self.files[position]) as image:
                self.sizes[slot] = image.size
        return tuple(int(value) for value in self.sizes[slot])


class DaliLoader:
    """Batches ``(images [B, 3, H, W] float, labels [B] int64)`` on ``device``; ``set_epoch``,
    ``len()`` and the order as ``TorchLoader``'s.

    ``bad_images`` ({path: reason}): this split's files known bad, left out of ``samples`` before
    the run (``known_bad``, logged once here) or reported by other ranks (``exclude(bad)``, only
    recorded: every rank leaves out the same verified files).

    Training augmentations: the crop and flip (``crop_flip``), ``auto_augment`` (a timm
    auto-augment string DALI implements, see ``dali_auto_augment``) and ``random_erasing``
    (timm's RandomErasing for ``device``, applied to each image there), each sample's draws its
    own (see the module's docstring).
    """

    def __init__(self, samples, num_classes, *, training, batch_size, image_size, mean, std,
                 crop_ratio, rank=0, world_size=1, device="cpu", workers=4,
                 channels_last=False, seed=0, known_bad=None, auto_augment=None,
                 random_erasing=None, crop_flip=CropFlip(), augment_views=None):
        self.samples, self.num_classes, self.dataset_size = samples, num_classes, len(samples)
        self.training, self.batch_size, self.crop_flip = training, batch_size, crop_flip
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.channels_last = torch.device(device), channels_last
        self.policy = PolicyDraws(image_net_policy()) if dali_auto_augment(auto_augment) else None
        self.pipeline_options = dict(
            training=training, image_size=image_size,
            resize_size=eval_resize(image_size, crop_ratio), mean=mean, std=std,
            gpu=self.device.type == "cuda", policy=self.policy, batch_size=batch_size,
            num_threads=max(workers, 1),
            device_id=(self.device.index or 0) if self.device.type == "cuda" else None)
        self.random_erasing, self.augment_views = random_erasing, augment_views
        self.epoch = self.view = self.start_step = 0
        self.chosen = None  # the slots set_epoch was given
        self.slots, self.iterator, self.reading = [], None, False
        # Each sample's (width, height), read from its file's header when first drawn for; 0: not
        # yet. An array rather than a dict: a few bytes a sample on ImageNet's 1.28 M.
        self.sizes = np.zeros((self.dataset_size, 2), dtype=np.int32)
        self.bad_images = {}
        record_bad(self.bad_images, known_bad or {}, log=True)

    def exclude(self, bad):
        record_bad(self.bad_images, bad, log=False)

    def set_epoch(self, epoch, start_step=0, slots=None):
        """As ``TorchLoader.set_epoch``: ``slots``, if given, the sample indices to read."""
        if (epoch, start_step, slots) != (self.epoch, self.start_step, self.chosen):
            self.epoch, self.start_step, self.chosen, self.iterator = (epoch, start_step, slots,
                                                                       None)
            self.view = augment_view(epoch, self.augment_views)

    def _build(self):
        """The epoch's pipeline (rebuilt per epoch and start: the order changes), built where its
        threads cannot take the stop signals."""
        if self.chosen is not None:
            self.slots = list(self.chosen)
        elif self.training:
            self.slots = train_indices(self.dataset_size, seed=self.seed, epoch=self.epoch,
                                       batch_size=self.batch_size, rank=self.rank,
                                       world_size=self.world_size, start_step=self.start_step)
        else:
            self.slots = eval_indices(self.dataset_size, self.rank, self.world_size)
        files = [self.samples[index][0] for index in self.slots]
        labels = [self.samples[index][1] for index in self.slots]
        draws = SampleDraws(files, self.slots, self.sizes, seed=self.seed, epoch=self.view,
                            batch_size=self.batch_size, crop_flip=self.crop_flip,
                            policy=self.policy)
        with blocked_for_children():  # the iterator runs the pipeline's first batches too
            pipeline = image_pipeline(files=files, labels=labels, draws=draws, seed=self.seed,
                                      **self.pipeline_options)
            pipeline.build()
            return DALIGenericIterator([pipeline], ["images", "labels"], reader_name=READER,
                                       last_batch_policy=LastBatchPolicy.PARTIAL,
                                       auto_reset=True)

    def __len__(self):
        if self.chosen is not None:
            return math.ceil(len(self.chosen) / self.batch_size)
        if self.training:
            return steps_per_epoch(self.dataset_size, self.batch_size, self.world_size)
        return math.ceil(len(eval_indices(self.dataset_size, self.rank, self.world_size))
                         / self.batch_size)

    def start(self):
        """Nothing to start: no worker processes (see ``TorchLoader.start``)."""

    def close(self):
        """Free the pipeline and its threads now rather than at interpreter shutdown."""
        self.iterator = None

    def __iter__(self):
        """The epoch from ``start_step``, at every pass: a pass left before its end leaves the
        pipeline mid-epoch, which DALI cannot reset, so the next one builds it again."""
        if self.iterator is None or self.reading:
            self.iterator = self._build()
        self.reading, position = True, 0
        for batch in self.iterator:
            images, labels = to_device(batch[0]["images"], batch[0]["labels"], self.device,
                                       self.channels_last)
            if self.random_erasing:
                slots = self.slots[position:position + len(labels)]
                images = erase_samples(images, self.random_erasing,
                                       [erase_seed(self.seed, self.view, slot) for slot in slots])
            position += len(labels)
            yield images, labels
        self.reading = False
