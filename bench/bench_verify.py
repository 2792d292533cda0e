"""Throughput of the verification pass that runs before a DALI loader is built (every file decoded
once with PIL, in a process pool): ``pytest bench/bench_verify.py``.

Two datasets: the demo digits (1797 JPEGs of 32x32) and 5,000 generated JPEGs of 500x375
(ImageNet's typical size; one smooth pattern plus noise, shifted by a different amount in each
file: about 110 kB each, near ImageNet's mean file size), generated once per session in
parallel. Each round starts with no cache (removed before the round, untimed), so every file is
decoded; the files themselves are in the page cache. files/s = files / round time.
"""

import functools
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fastkd.data.demo import build_demo_dataset
from fastkd.data.folders import scan_image_folder
from fastkd.data.verify import cache_file, verify_images

NUM_IMAGES, NUM_CLASSES, HEIGHT, WIDTH = 5000, 10, 375, 500
WORKERS = os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def photo_pixels():
    """A 500x375 image that compresses like a photo: a smooth pattern plus noise."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pattern = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 9),
                        128 + 60 * np.sin((x + y) / 11)], -1)
    noise = np.random.default_rng(0).normal(0, 20, pattern.shape)
    return (pattern + noise).clip(0, 255).astype(np.uint8)


def write_photo(path, index):
    """Image ``index``: the photo shifted by 7 * index columns, as a quality-90 JPEG."""
    Image.fromarray(np.roll(photo_pixels(), 7 * index, axis=1)).save(path, quality=90)


@pytest.fixture(scope="session")
def photos_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-bench")
    paths = [root / f"class{index % NUM_CLASSES}" / f"{index:05d}.jpeg"
             for index in range(NUM_IMAGES)]
    for folder in {path.parent for path in paths}:
        folder.mkdir()
    photo_pixels()  # once, before the workers fork
    with ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(write_photo, paths, range(NUM_IMAGES), chunksize=64))
    return root, [str(path) for path in paths]


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    root = build_demo_dataset(str(tmp_path_factory.mktemp("verify-bench-demo")))
    splits = [scan_image_folder(os.path.join(root, split)) for split in ("train", "val")]
    return root, [path for split in splits for path, _ in split.samples]


@pytest.mark.parametrize("dataset", ["demo", "photos"])
def bench_verify_cold(benchmark, dataset, request):
    root, paths = request.getfixturevalue(f"{dataset}_folder")
    cache = cache_file(root)

    def without_cache():
        if os.path.exists(cache):
            os.remove(cache)

    def verify():
        verification = verify_images(root, paths, WORKERS)
        assert verification.decoded == len(paths) and not verification.bad

    benchmark.group = f"verification, cold cache, {WORKERS} workers"
    benchmark.pedantic(verify, setup=without_cache, rounds=3)
    benchmark.extra_info["files"] = len(paths)
    benchmark.extra_info["files_per_second"] = len(paths) / benchmark.stats.stats.median
