"""The DALI loader: JPEG decoding and augmentation in DALI, on the GPU when there is one.

With CUDA, decoding is ``device="mixed"`` (nvJPEG) and the augmentations run on
``device_id=local_rank``; without CUDA the same pipeline runs CPU-only (``device_id=None``). The
file list of each epoch is this rank's shard of one global permutation (``epoch_order``), given to
``fn.readers.file`` with ``pad_last_batch=True``, and the iterator drops the padding
(``LastBatchPolicy.PARTIAL``): every sample is read exactly once per epoch across ranks.

DALI cannot skip a file inside its pipeline, so ``samples`` must hold only files that decode:
``create_loaders`` decodes each once beforehand (``verify.py``) and leaves the bad ones out.

Training augmentations: of timm's auto-augment strings, DALI implements those listed in
``DALI_AUTO_AUGMENT`` (``dali_auto_augment`` refuses the others), with DALI's own operators on
the uint8 crop; timm's random erasing runs on each normalised batch on the training device.
"""

import math

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import auto_augment as policies
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .augment import CropFlip
from .bad_images import record_bad
from .common import epoch_order, eval_resize, to_device
from .folders import shard_bounds

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


@pipeline_def(enable_conditionals=True)  # DALI's auto-augment chooses operators per sample
def image_pipeline(files, labels, training, image_size, resize_size, mean, std, gpu,
                   auto_augment_args, crop_flip):
    jpegs, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                    pad_last_batch=True, name=READER)
    decode_device = "mixed" if gpu else "cpu"
    if training:
        images = fn.decoders.image_random_crop(
            jpegs, device=decode_device, output_type=types.RGB,
            random_area=list(crop_flip.scale), random_aspect_ratio=list(crop_flip.ratio))
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        mirror = fn.random.coin_flip(probability=crop_flip.hflip)
        if auto_augment_args:
            # timm's order: crop, flip, policy. Where timm fills with the mean colour, DALI
            # takes one grey level: the average of that colour's channels.
            images = fn.flip(images, horizontal=mirror)
            images = policies.auto_augment(
                images, shape=(image_size, image_size), fill_value=round(255 * sum(mean) / 3),
                interp_type=types.INTERP_LINEAR, **auto_augment_args)
            mirror = False
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=resize_size)
        mirror = False
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(image_size, image_size),
        mean=[255 * value for value in mean], std=[255 * value for value in std], mirror=mirror)
    return images, labels


class DaliLoader:
    """Batches ``(images [B, 3, H, W] float, labels [B] int64)`` on ``device``.

    ``bad_images`` ({path: reason}): this split's files known bad, left out of ``samples`` before
    the run (``known_bad``, logged once here) or reported by other ranks (``exclude(bad)``, only
    recorded: every rank leaves out the same verified files).

    Training augmentations: ``auto_augment`` (a timm auto-augment string DALI implements, see
    ``dali_auto_augment``) and ``random_erasing`` (timm's RandomErasing for ``device``, applied to
    each batch there).
    """

    def __init__(self, samples, num_classes, *, training, batch_size, image_size, mean, std,
                 crop_ratio, rank=0, world_size=1, device="cpu", workers=4,
                 channels_last=False, seed=0, known_bad=None, auto_augment=None,
                 random_erasing=None, crop_flip=CropFlip()):
        self.samples, self.num_classes, self.dataset_size = samples, num_classes, len(samples)
        self.training, self.batch_size = training, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.channels_last = torch.device(device), channels_last
        self.pipeline_options = dict(
            training=training, image_size=image_size,
            resize_size=eval_resize(image_size, crop_ratio),
            mean=mean, std=std, gpu=self.device.type == "cuda",
            auto_augment_args=dali_auto_augment(auto_augment), crop_flip=crop_flip,
            batch_size=batch_size,
            num_threads=max(workers, 1),
            device_id=(self.device.index or 0) if self.device.type == "cuda" else None)
        self.random_erasing = random_erasing
        self.epoch, self.iterator = 0, None
        self.bad_images = {}
        record_bad(self.bad_images, known_bad or {}, log=True)

    def exclude(self, bad):
        record_bad(self.bad_images, bad, log=False)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.iterator = epoch, None

    def _build(self):
        """A pipeline over this epoch's shard (rebuilt per epoch: the order changes)."""
        order = epoch_order(self.dataset_size, self.rank, self.world_size, self.training,
                            self.seed, self.epoch)
        files = [self.samples[index][0] for index in order]
        labels = [self.samples[index][1] for index in order]
        pipeline = image_pipeline(files=files, labels=labels,
                                  seed=self.seed + 1000 * self.epoch + self.rank,
                                  **self.pipeline_options)
        pipeline.build()
        return DALIGenericIterator([pipeline], ["images", "labels"], reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def __len__(self):
        start, stop = shard_bounds(self.dataset_size, self.rank, self.world_size)
        return math.ceil((stop - start) / self.batch_size)

    def close(self):
        """Free the pipeline and its threads now rather than at interpreter shutdown."""
        self.iterator = None

    def __iter__(self):
        if self.iterator is None:
            self.iterator = self._build()
        for batch in self.iterator:
            images, labels = to_device(batch[0]["images"], batch[0]["labels"], self.device,
                                       self.channels_last)
            if self.random_erasing:
                images = self.random_erasing(images)
            yield images, labels
