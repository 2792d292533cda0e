"""``create_loaders``: a dataset's training and validation loaders (see the package's
docstring)."""


import logging

import torch

from ..optional import importable
from . import DATASETS, LOADERS
from .augment import random_erasing, timm_auto_augment
from .bad_images import bad_files_error, check_mode
from .cifar import CIFAR100, cifar_transform
from .common import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DEFAULT_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loader,
    check_normalisation,
)
from .crop_flip import CropFlip
from .demo import build_demo_dataset, default_demo_root
from .folders import scan_split_folders
from .glyphs import build_glyph_dataset, default_glyph_root
from .nvjpeg import NvJpegLoader
from .splits import eval_split_problem
from .synthetic import synthetic_loaders
from .torch_loader import FileDataset, TorchLoader, image_transform

logger = logging.getLogger(__name__)
# The datasets fastkd writes itself on first use: (builder, default folder).
WRITTEN = {"demo": (build_demo_dataset, default_demo_root),
           "glyphs": (build_glyph_dataset, default_glyph_root)}


def dali_available():
    return importable("nvidia.dali")


def resolve_loader(loader, dataset, device):
    """The loader ``loader`` names for ``dataset`` on ``device``; ``"auto"``: DALI when
    installed, else on CUDA torchvision's nvJPEG decoding, else torchvision on the CPU."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    cuda = torch.device(device).type == "cuda"
    if dataset == "cifar100":
        if loader in ("dali", "nvjpeg"):
            raise ValueError(f"loader={loader!r} does not read CIFAR-100 (already-decoded "
                             "arrays); use loader='torch' or 'auto'")
        return "torch"
    if loader == "auto":
        if dali_available():
            return "dali"
        logger.warning("DALI is not installed (pip install 'fastkd[dali]'): using the %s",
                       "nvjpeg loader (torchvision's GPU decoding)" if cuda else
                       "torchvision loader")
        return "nvjpeg" if cuda else "torch"
    if loader == "dali" and not dali_available():
        raise ValueError("loader='dali' needs nvidia-dali (pip install 'fastkd[dali]')")
    if loader == "nvjpeg" and not cuda:
        raise ValueError(f"loader='nvjpeg' decodes on a CUDA device; this run's device is "
                         f"{device}: use loader='torch'")
    return loader


def create_loaders(dataset, data_dir=None, *, batch_size, image_size=None, loader="auto",
                   eval_batch_size=None, rank=0, world_size=1, device="cpu", workers=4,
                   channels_last=False, seed=0, crop_ratio=DEFAULT_CROP_RATIO,
                   bad_images="skip", mean=None, std=None, auto_augment=None, re_prob=0.0,
                   re_mode="pixel", re_count=1, crop_flip=CropFlip(), num_classes=None,
                   synthetic_samples=None, val_split="val",
                   augment_views=None) -> tuple[Loader, Loader]:
    """``(train_loader, val_loader)`` for ``dataset``, each a ``common.Loader``.

    - ``dataset``: ``"imagenet"`` / ``"folder"``: ``data_dir/train/<class>/*`` and
      ``data_dir/val/<class>/*``; ``"demo"``: the bundled digits, written as JPEGs under
      ``data_dir`` (default: the user cache) on first use; ``"glyphs"``: characters in
      matplotlib's fonts, 100 classes, held-out fonts in val (``glyphs.py``), made the same way;
      ``"cifar100"``: the python archive
      under ``data_dir`` (torchvision loader); ``"synthetic"``: random images and labels of
      ``num_classes`` classes made once on ``device``, ``synthetic_samples`` per training epoch
      (no files, no loader, no augmentation: see ``synthetic.py``).
    - ``val_split``: the split the evaluation loader reads (a folder under ``data_dir``; the
      glyphs have ``"val"`` and ``"test"``, the other built-in datasets ``"val"`` only); never
      ``"train"``.
    - ``batch_size`` / ``eval_batch_size`` (default ``batch_size``): per rank, per batch.
    - ``image_size``: the square side of every batch; defaults to 224 for folders and 32 for
      demo, glyphs and CIFAR-100. Training crops at random (random-resized-crop + flip;
      CIFAR-100: padded random crop + flip); evaluation resizes the shorter side to
      ``image_size / crop_ratio`` and centre-crops (CIFAR-100: resize only).
    - ``loader``: ``"dali"``, ``"nvjpeg"`` (torchvision's JPEG decoding on the CUDA device;
      workers read the files' bytes, see ``nvjpeg.py``), ``"torch"`` (torchvision on CPU
      workers) or ``"auto"`` (DALI when installed, else nvjpeg on CUDA, else torch).
    - ``rank`` / ``world_size``: this process's shard; ``seed``: the per-epoch shuffle (and
      DALI's random augmentations); ``device``: where batches are delivered; ``workers``: DALI
      threads or DataLoader processes; ``channels_last``: that memory format for the images.
    - ``mean`` / ``std``: normalisation per RGB channel, in [0, 1] pixel units, e.g. a timm
      model's ``resolve_data_config``; default ImageNet's, CIFAR-100's for ``"cifar100"``.

    Training augmentations (the training split only; evaluation is never augmented):

    - ``crop_flip``: the random-resized crop's area and aspect-ratio ranges and the flip
      probability (``crop_flip.CropFlip``; timm's ``--scale``, ``--ratio``, ``--hflip``); CIFAR-100
      takes only the flip probability (its crop is a padded random crop).

    - ``auto_augment``: a timm auto-augment string (timm's ``--aa``: ``"v0"``, ``"original"``,
      ``"rand-m9-mstd0.5-inc1"``, ``"augmix-m5-w4-d2"``, ...), applied after crop and flip. The
      torchvision loader runs timm's policy; DALI runs its own implementation where it has one
      equal to timm's (``"v0"``, see ``dali.DALI_AUTO_AUGMENT``) and refuses the others.
    - ``re_prob``, ``re_mode``, ``re_count``: timm's random erasing (``--reprob``,
      ``--remode`` const|rand|pixel, ``--recount``) of the normalised images: per sample in the
      torchvision workers, per batch on ``device`` for DALI.
    - ``augment_views``: K to make epoch e draw the augmentations of epoch e mod K
      (``order.augment_view``; the order still changes every epoch).
    A string timm does not accept, a policy DALI lacks and bad random-erasing settings raise
    ValueError before any file is read.

    Image files that do not decode (folders and demo): each file's header is checked at start,
    and for DALI, which cannot skip a file inside its pipeline, and with ``bad_images="error"``,
    which names them all before the run, every file is decoded once before the loaders are
    built (in ``workers`` processes; cached next to the data, see ``verify.py``).
    ``bad_images="skip"`` leaves the files found bad at start out of their split (labels stay
    those of the class folders) and the torchvision loader replaces a file it finds bad while
    reading by the next readable sample of the split; ``"error"`` raises ``BadImageError`` (a
    ValueError) listing every bad file.
    """
    check_mode(bad_images)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    problem = eval_split_problem(dataset, val_split)
    if problem:
        raise ValueError(f"val_split {val_split!r} {problem}")
    if dataset == "synthetic":
        if loader != "auto":
            raise ValueError(f"synthetic data is made on the device, without a loader: got "
                             f"loader={loader!r}")
        return synthetic_loaders(num_classes, synthetic_samples, batch_size=batch_size,
                                 eval_batch_size=eval_batch_size, image_size=image_size or 224,
                                 rank=rank, world_size=world_size, device=device,
                                 channels_last=channels_last, seed=seed)
    if dataset not in WRITTEN and not data_dir:
        raise ValueError(f"dataset {dataset!r} needs data_dir (the dataset's root directory)")
    kind = resolve_loader(loader, dataset, device)
    image_size = image_size or (224 if dataset in ("imagenet", "folder") else 32)
    default_mean, default_std = ((CIFAR100_MEAN, CIFAR100_STD) if dataset == "cifar100"
                                 else (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = check_normalisation(default_mean if mean is None else mean,
                                    default_std if std is None else std)
    # Every augmentation setting is checked here, before any file is read.
    pil_auto_augment = timm_auto_augment(auto_augment, image_size, mean) if auto_augment else None
    if kind == "dali":
        from .dali import DaliLoader, dali_auto_augment

        dali_auto_augment(auto_augment)
        train_augment = dict(auto_augment=auto_augment,
                             random_erasing=random_erasing(re_prob, re_mode, re_count, device))
    elif kind == "nvjpeg":
        if auto_augment:
            raise ValueError(f"loader='nvjpeg' has no auto-augment (got {auto_augment!r}): use "
                             "loader='torch' (timm's policies) or 'dali'")
        train_augment = dict(random_erasing=random_erasing(re_prob, re_mode, re_count, device))
    else:  # timm's transforms, per sample on the DataLoader workers
        train_augment = dict(auto_augment=pil_auto_augment,
                             random_erasing=random_erasing(re_prob, re_mode, re_count, "cpu"))
    train_augment["crop_flip"] = crop_flip
    common = dict(rank=rank, world_size=world_size, device=device, workers=workers,
                  channels_last=channels_last, seed=seed, augment_views=augment_views)
    splits = (("train", True, train_augment, batch_size),
              ("val", False, {}, eval_batch_size or batch_size))

    if dataset == "cifar100":
        return tuple(
            TorchLoader(CIFAR100(data_dir, split, cifar_transform(training, image_size, mean, std,
                                                                  **augment)),
                        100, training=training, batch_size=size, **common)
            for split, training, augment, size in splits)

    if dataset in WRITTEN:
        build, default_root = WRITTEN[dataset]
        data_dir = build(data_dir or default_root())
    folders = scan_split_folders(f"{data_dir}/train", f"{data_dir}/{val_split}")
    # DALI cannot skip a file inside its pipeline, and nvJPEG decodes corrupt JPEGs without an
    # error (to wrong pixels): both need every file decoded once by PIL first.
    if kind in ("dali", "nvjpeg") or bad_images == "error":
        from .verify import verify_images

        verification = verify_images(
            data_dir, [path for folder in folders for path, _ in folder.samples], workers)
        logger.info("verified %d images: %d bad, %d decoded, %d cached (%s)",
                    verification.checked, len(verification.bad), verification.decoded,
                    verification.cached, verification.cache)
        folders = [folder.without(verification.bad) for folder in folders]
    bad = {path: reason for folder in folders for path, reason in folder.bad.items()}
    if bad and bad_images == "error":
        raise bad_files_error(bad)
    loaders = []
    for (_, training, augment, size), folder in zip(splits, folders):
        if kind == "dali":
            loaders.append(DaliLoader(
                folder.samples, folder.num_classes, training=training, batch_size=size,
                image_size=image_size, mean=mean, std=std, crop_ratio=crop_ratio,
                known_bad=folder.bad, **augment, **common))
        elif kind == "nvjpeg":
            loaders.append(NvJpegLoader(
                folder.samples, folder.num_classes, training=training, batch_size=size,
                image_size=image_size, mean=mean, std=std, crop_ratio=crop_ratio,
                known_bad=folder.bad, bad_images=bad_images, **augment, **common))
        else:
            transform = image_transform(training, image_size, mean, std, crop_ratio, **augment)
            loaders.append(TorchLoader(FileDataset(folder.samples, transform, bad_images),
                                       folder.num_classes, training=training, batch_size=size,
                                       known_bad=folder.bad, **common))
    return tuple(loaders)
