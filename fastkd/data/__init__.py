"""Training and evaluation input: one loader interface over DALI, torchvision's GPU decoding
(nvJPEG) and torchvision on the CPU.

``loaders.create_loaders(dataset, data_dir, ...)`` returns ``(train_loader, val_loader)``.
Iterating a loader yields ``(images [B, 3, H, W] float normalised by mean and std, labels [B]
int64)`` on the training device; each has ``len()`` (batches this rank reads per epoch),
``set_epoch(epoch)``, ``num_classes`` and ``dataset_size`` (samples across all ranks). Every
sample is read exactly once per epoch across ranks, by both loaders: training takes a shard of
one seeded permutation per epoch, evaluation a shard of the sorted list.

Training augmentations are timm's (``augment.py``): crop and flip, an auto-augment policy
(timm's ``--aa`` strings; the DALI loader runs DALI's implementation of the one policy it shares
with timm and refuses the rest) and random erasing of the normalised images.

Bad image files (``bad_images="skip"`` or ``"error"``, see ``bad_images.py``): each loader's
``bad_images`` is {path: reason} of its split's files known bad in this process, and
``exclude(bad)`` takes those other ranks found, so that they are not read again.
``fastkd-verify-data DIR`` (``verify.py``) lists every bad file of a dataset.
"""

# What the command line checks before torch is imported: this package's __init__ stays light.
DATASETS = ("demo", "glyphs", "imagenet", "folder", "cifar100", "synthetic")
LOADERS = ("auto", "dali", "nvjpeg", "torch")
