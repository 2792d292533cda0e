"""Input pipeline throughput: DALI (CPU pipeline here, GPU decoding on CUDA) against torchvision
on the same JPEG tree and the same training transforms, in one run: ``pytest bench/``.

The tree is generated: 512 JPEGs of 500x375 (ImageNet's typical size) in 8 classes, cropped to
224. One timed round is one epoch; images/s = 512 / time.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data.loaders import create_loaders, dali_available

NUM_IMAGES, NUM_CLASSES = 512, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKERS = 2


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-bench")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for index in range(NUM_IMAGES):
        for split in ("train", "val"):
            folder = root / split / f"class{index % NUM_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train" or index < NUM_CLASSES:
                image = np.roll(base, 7 * index, axis=1)
                Image.fromarray(image).save(folder / f"{index}.jpeg", quality=90)
    return root


@pytest.mark.parametrize("loader", ["dali", "torch"])
def bench_loader_train_epoch(benchmark, jpeg_tree, loader):
    if loader == "dali" and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    train, _ = create_loaders("folder", str(jpeg_tree), batch_size=64, image_size=224,
                              loader=loader, device=DEVICE, workers=WORKERS)
    benchmark.group = f"train epoch, {NUM_IMAGES} JPEGs 500x375 -> 224, {WORKERS} workers"
    benchmark.extra_info["images"] = NUM_IMAGES
    epoch = iter(range(1000))

    def one_epoch():
        train.set_epoch(next(epoch))
        count = sum(len(labels) for _, labels in train)
        assert count == NUM_IMAGES

    benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1)
