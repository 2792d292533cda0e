"""The torchvision loader: PIL decoding and torchvision transforms on DataLoader workers."""

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from .common import epoch_order, eval_resize, to_device
from .folders import shard_bounds


def image_transform(training, image_size, mean, std, crop_ratio):
    """timm/ImageNet convention: random-resized-crop + flip for training; resize the shorter
    side to image_size / crop_ratio and centre-crop for evaluation."""
    if training:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(eval_resize(image_size, crop_ratio)),
                 transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


class FileDataset(Dataset):
    """(path, label) samples read with PIL as RGB."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class ShardSampler(Sampler):
    """This rank's share of each epoch, without padding (see ``epoch_order``)."""

    def __init__(self, size, rank, world_size, shuffle, seed):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.size, self.rank, self.world_size, self.shuffle, self.seed,
                                self.epoch))

    def __len__(self):
        start, stop = shard_bounds(self.size, self.rank, self.world_size)
        return stop - start


class TorchLoader:
    """Batches ``(images [B, 3, H, W] float, labels [B] int64)`` on ``device``."""

    def __init__(self, dataset, num_classes, *, training, batch_size, rank=0, world_size=1,
                 device="cpu", workers=4, channels_last=False, seed=0):
        self.num_classes, self.dataset_size = num_classes, len(dataset)
        self.device, self.channels_last = torch.device(device), channels_last
        self.sampler = ShardSampler(len(dataset), rank, world_size, training, seed)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            drop_last=False)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield to_device(images, labels, self.device, self.channels_last)
