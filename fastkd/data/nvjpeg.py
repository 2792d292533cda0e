"""The nvJPEG loader: JPEGs decoded on the training device by torchvision (nvJPEG on CUDA), for
GPU machines without DALI.

Design:

- DataLoader workers only read files. A JPEG travels as its compressed bytes (a 1-D uint8
  tensor, about a tenth of its pixels), so the workers need little CPU and the batches little
  inter-process memory. A file that is not a JPEG (PNG, BMP, WebP; rare) is decoded in the worker
  with PIL and travels as pixels ([3, H, W] uint8). Images are not stacked (each has its own size
  until it is cropped): a batch's JPEG bytes travel concatenated in one tensor, since each tensor
  costs a shared-memory transfer between processes.
- The main process decodes each batch's JPEGs with one batched ``decode_jpeg`` call on the
  device, then crops, resizes, flips and normalises there. Crop parameters come from the decoded
  shapes (host metadata) and each sample's host ``torch.Generator``, seeded by (seed, epoch,
  sample index) (``order``): the augmentations are reproducible, do not depend on the workers,
  and nothing in a batch's path waits for the device. The decoded images live in memory of
  their own until the transforms have read them (``JpegDecoder``: torchvision's CUDA decoder
  does not wait for the caller's stream before it writes).
- Everything runs in the training process's thread, queued on the device without waiting for
  it, so the device's decode and transform work overlaps the host's. A background thread on a
  side stream, decoding batches ahead, was tried and did not pay on an H200 (256 500x375 JPEGs a
  batch, 8 workers): the loader alone delivered 4300-5900 images/s with it and 8100-9800
  without, and with a matmul "training step" the two were within noise.
- Order, sharding and ``bad_images`` are ``TorchLoader``'s (this class is one, with a different
  DataLoader): the same labels in the same order as the torchvision loader for the same seed,
  epoch and rank.

Bad files: a file that cannot be read, a non-JPEG or a truncated JPEG that PIL cannot decode is
met in a worker and replaced there as ``FileDataset`` does. Any other broken JPEG is met when
decoding: when the batched decode fails, each image is decoded alone, on the device and then with
PIL on the CPU (nvJPEG does not take every JPEG, e.g. CMYK ones); a file PIL cannot decode either
is bad, by PIL's verdict as everywhere in fastkd, and is replaced by the next readable sample of
the split in file order (or, with ``bad_images="error"``, raises ``BadImageError`` naming it).
nvJPEG, unlike libjpeg-turbo and PIL, decodes a JPEG whose compressed data is corrupt (or
missing) without an error, to wrong pixels: on CUDA such files are found only by decoding every
file with PIL before the run (``verify.py``, as for DALI).
"""


import collections

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from .augment import crop_params, erase_samples, flip_drawn
from .bad_images import (
    DECODE_ERRORS,
    BadImageError,
    bad_file_error,
    describe,
    read_rgb,
    wrap_from,
)
from .common import eval_resize, to_device
from .crop_flip import CropFlip
from .order import erase_seed, sample_seed
from .torch_loader import FileDataset, SeededItems, TorchLoader

JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker and the next marker's first byte
JPEG_END = b"\xff\xd9"  # end-of-image marker


def read_encoded(path):
    """The file at ``path`` as a uint8 tensor: a JPEG's bytes (1-D, for ``decode_jpeg``), any
    other image decoded with PIL ([3, H, W], RGB). A JPEG that does not end with its end-of-image
    marker (truncated, or with bytes after it) is decoded with PIL too: nvJPEG decodes a
    truncated JPEG without an error, to grey where the data is missing. Raises one of
    ``DECODE_ERRORS`` for a file that cannot be read or, decoded here, does not decode."""
    data = np.fromfile(path, dtype=np.uint8)
    if data[:3].tobytes() == JPEG_MAGIC and data[-2:].tobytes() == JPEG_END:
        return torch.from_numpy(data)
    return pil_to_tensor(read_rgb(path))  # by path: PIL's messages name the file


class EncodedFileDataset(FileDataset):
    """``FileDataset`` whose items keep JPEGs encoded: item ``index`` is ``(data, label, bad,
    read)`` (``FileDataset.first_readable``), ``data`` from ``read_encoded``."""

    def __init__(self, samples, bad_images="skip"):
        super().__init__(samples, transform=None, bad_images=bad_images)

    def read(self, path):
        return read_encoded(path)

    def __getitem__(self, index):
        return self.first_readable(index)


def collate_encoded(batch):
    """``(packed, parts, labels, bad, read)`` from ``EncodedFileDataset`` items: the JPEG bytes
    concatenated into one uint8 tensor ``packed``, and ``parts`` that say what each item is: its
    number of bytes in ``packed`` (in order), or its image decoded in the worker. One tensor
    crosses from the worker process, not one per image (each costs a shared-memory transfer);
    ``unpack`` restores the list. Then the labels as one tensor, the items' bad files merged
    into one dict and the sample indices read."""
    data, labels, found, read = zip(*batch)
    jpegs = [item for item in data if item.dim() == 1]
    packed = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
    parts = [len(item) if item.dim() == 1 else item for item in data]
    bad = {}
    for sample_bad in found:
        bad.update(sample_bad)
    return packed, parts, default_collate(labels), bad, list(read)


def unpack(packed, parts):
    """The items of ``collate_encoded``'s batch, each as ``read_encoded`` gave it: views of
    ``packed`` for the JPEGs (no copy), the decoded images as they came."""
    views = iter(torch.split(packed, [part for part in parts if isinstance(part, int)]))
    return [next(views) if isinstance(part, int) else part for part in parts]


class JpegDecoder:
    """``decode_jpeg`` to RGB uint8 [3, H, W] images on ``device``, safe from torchvision's
    CUDA decoder, which (0.26 at least) allocates its images on the caller's stream but writes
    them from a stream of its own that does not wait for the caller's: a block that the training
    step freed while its queued kernels still read it could be handed to the decoder and
    overwritten under them (this loader's first GPU runs: non-finite losses within 20 steps;
    torchvision PR #9606). So on CUDA the images are allocated on a stream of this decoder's own,
    whose blocks only ever hold decoded images, and ``retire`` keeps them until the caller's work
    queued on them has run, so no block returns to the decoder while it is being read.
    (``Tensor.record_stream`` would do the same, but a tensor marked so calls CUDA when freed,
    which aborts a DataLoader worker forked after decoding that collects one it inherited.)"""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.in_use = collections.deque()  # (event on the caller's stream, images), oldest first

    def decode(self, jpegs):
        """The images of the 1-D uint8 tensors ``jpegs``; pass them to ``retire`` once every
        kernel that reads them is queued."""
        if self.stream is None:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        with torch.cuda.stream(self.stream):
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return images

    def retire(self, images):
        """Hold ``images`` until the work now queued on the caller's stream has run; drop the
        ones whose work has."""
        if self.stream is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.in_use.append((event, images))
        while self.in_use and self.in_use[0][0].query():
            self.in_use.popleft()


def decode_file(path, data, decoder):
    """One file as a uint8 [3, H, W] image on the ``JpegDecoder``'s device, from its
    ``read_encoded`` tensor ``data``: decoded on the device, and where that fails, the file with
    PIL on the CPU (whose error, one of ``DECODE_ERRORS``, is raised where that fails too)."""
    device = decoder.device
    if data.dim() == 3:  # decoded in the worker
        return data.to(device, non_blocking=True)
    try:
        return decoder.decode([data])[0]
    except RuntimeError:  # e.g. a CMYK JPEG on nvJPEG, or a broken body
        return pil_to_tensor(read_rgb(path)).to(device, non_blocking=True)


def decode_images(encoded, paths, decoder):
    """``(images, failures)`` for a batch of ``read_encoded`` tensors of the files ``paths``:
    uint8 [3, H, W] images on the ``decoder``'s device (None where no decoder takes the file)
    and {position: PIL's error} of those. All JPEGs go in one batched decode; if that raises
    (one image fails the whole call), each file is decoded alone (``decode_file``). Pass the
    images to ``decoder.retire`` once the work that reads them is queued."""
    images, failures = [None] * len(encoded), {}
    jpegs = [position for position, data in enumerate(encoded) if data.dim() == 1]
    if jpegs:
        try:
            decoded = decoder.decode([encoded[position] for position in jpegs])
        except RuntimeError:
            decoded = []  # each alone, below
        for position, image in zip(jpegs, decoded):
            images[position] = image
    for position, (path, data) in enumerate(zip(paths, encoded)):
        if images[position] is None:
            try:
                images[position] = decode_file(path, data, decoder)
            except DECODE_ERRORS as error:
                failures[position] = error
    return images, failures


def resize(image, height, width):
    """``image`` ([3, H, W], any dtype) resized to float [3, height, width]: bilinear with
    antialiasing, torchvision's ``Resize(antialias=True)`` on float tensors."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                         antialias=True, align_corners=False)[0]


def resized_crop(image, top, left, crop_height, crop_width, size):
    """The crop, resized to float [3, size, size] (cropped first: only its pixels are read)."""
    return resize(image[:, top:top + crop_height, left:left + crop_width], size, size)


def resize_centre_crop(image, resize_to, size):
    """Evaluation: the shorter side resized to ``resize_to`` (the longer one in proportion,
    truncated, as torchvision's ``Resize(int)``), then torchvision's ``CenterCrop(size)``: zero
    padding where the image is smaller, the crop's corner rounded half to even."""
    _, height, width = image.shape
    longer = int(resize_to * max(height, width) / min(height, width))
    height, width = (longer, resize_to) if width <= height else (resize_to, longer)
    image = resize(image, height, width)
    pad_height, pad_width = max(size - height, 0), max(size - width, 0)
    if pad_height or pad_width:
        image = F.pad(image, (pad_width // 2, (pad_width + 1) // 2,
                              pad_height // 2, (pad_height + 1) // 2))
        height, width = height + pad_height, width + pad_width
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    return image[:, top:top + size, left:left + size]


def flip(images, mask):
    """``images`` [B, C, H, W] with the samples where ``mask`` [B] (bool, on their device) is
    set mirrored left-right: one batched select, no host sync."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


class NvJpegLoader(TorchLoader):
    """Batches ``(images [B, 3, S, S] float32, labels [B] int64)`` on ``device``, JPEGs decoded
    there (see the module's docstring). ``samples``: ``((path, label), ...)`` as
    ``ImageFolder.samples``; ``bad_images``: "skip" or "error" for files found bad while reading;
    ``known_bad``, ``bad_images`` (the attribute) and ``exclude`` as ``TorchLoader``'s.
    Training: random-resized crop to ``image_size`` and a horizontal flip (``crop_flip``), then
    ``random_erasing`` (a callable on the normalised batch, on ``device``; see
    ``augment.random_erasing``); evaluation: the shorter side resized to
    ``eval_resize(image_size, crop_ratio)`` and a centre crop. Resizing is bilinear with
    antialiasing, on float pixels (not rounded to uint8 as PIL and DALI do)."""

    def __init__(self, samples, num_classes, *, training, batch_size, image_size, mean, std,
                 crop_ratio, rank=0, world_size=1, device="cpu", workers=4,
                 channels_last=False, seed=0, known_bad=None, bad_images="skip",
                 random_erasing=None, crop_flip=CropFlip(), augment_views=None):
        dataset = EncodedFileDataset(samples, bad_images)
        super().__init__(dataset, num_classes, training=training, batch_size=batch_size,
                         rank=rank, world_size=world_size, device=device, workers=workers,
                         channels_last=channels_last, seed=seed, known_bad=known_bad,
                         augment_views=augment_views)
        # TorchLoader's DataLoader over encoded items: collated by collate_encoded (bytes packed,
        # images not stacked) and not pinned (decode_jpeg copies the bytes itself).
        self.loader = self.data_loader(SeededItems(dataset, seed), collate_encoded, workers,
                                       pin_memory=False)
        self.training, self.image_size, self.seed, self.rank = training, image_size, seed, rank
        self.resize_to = eval_resize(image_size, crop_ratio)
        self.decoder = JpegDecoder(self.device)
        self.random_erasing, self.crop_flip = random_erasing, crop_flip
        # (x / 255 - mean) / std as one multiply-add, on the device.
        std = torch.tensor(std, dtype=torch.float32)
        self.scale = (1 / (255 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std).view(1, 3, 1, 1).to(
            self.device)

    def _replacement(self, index, error, found):
        """``(image, label)`` for sample ``index``, whose file no decoder takes (``error``):
        the next sample in file order (wrapping) that decodes, as ``FileDataset`` replaces a
        bad file; ``found`` gets the bad files met. Raises with ``bad_images="error"``."""
        samples = self.dataset.samples
        self._found_bad(samples[index][0], error, found)
        for candidate in wrap_from(index, len(samples)):
            path, label = samples[candidate]
            if path in found or path in self.bad_images:
                continue
            try:
                return decode_file(path, read_encoded(path), self.decoder), label
            except DECODE_ERRORS as failure:
                self._found_bad(path, failure, found)
        raise BadImageError(f"none of the {len(samples)} files of this split decodes")

    def _found_bad(self, path, error, found):
        if self.dataset.mode == "error":
            raise bad_file_error(path, error) from error
        found[path] = describe(error)

    def prepare(self, batch, slots=None):
        """One DataLoader batch as the training step takes it: ``(images, labels, bad)`` on the
        device, ``bad`` the files found bad in the workers or here. ``slots``: the batch's
        sample indices in this epoch's plan, which seed its augmentations (training only)."""
        packed, parts, labels, bad, read = batch
        encoded = unpack(packed, parts)
        found = dict(bad)
        samples = self.dataset.samples
        decoded, failures = decode_images(encoded, [samples[index][0] for index in read],
                                          self.decoder)
        for position, error in failures.items():
            decoded[position], labels[position] = self._replacement(read[position], error,
                                                                    found)
        view = self.sampler.view  # the epoch whose augmentations this one draws
        if self.training:
            crops, mirror = [], []
            for image, slot in zip(decoded, slots):
                generator = torch.Generator().manual_seed(sample_seed(self.seed, view, slot))
                box = crop_params(*image.shape[1:], generator, self.crop_flip)
                crops.append(resized_crop(image, *box, self.image_size))
                mirror.append(flip_drawn(generator, self.crop_flip))
            images = flip(torch.stack(crops), torch.tensor(mirror).to(self.device,
                                                                      non_blocking=True))
        else:
            images = torch.stack([resize_centre_crop(image, self.resize_to, self.image_size)
                                  for image in decoded])
        self.decoder.retire(decoded)
        images, labels = to_device(images.mul_(self.scale).add_(self.shift), labels, self.device,
                                   self.channels_last)
        if self.random_erasing:
            images = erase_samples(images, self.random_erasing,
                                   [erase_seed(self.seed, view, slot) for slot in slots])
        return images, labels, found

    def __iter__(self):
        slots = self.sampler.slots()
        for number, batch in enumerate(self.batches()):
            keys = slots[number * self.batch_size:(number + 1) * self.batch_size]
            images, labels, bad = self.prepare(batch, keys)
            if bad:
                self._add_bad(bad, log=True)
            yield images, labels
