"""Data loaders on real JPEG trees: DALI (CPU pipeline) and torchvision, sharding, CIFAR-100,
the demo dataset and bad input."""

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import loaders
from fastkd.data.common import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, Loader
from fastkd.data.demo import build_demo_dataset
from fastkd.data.loaders import create_loaders
from fastkd.data.nvjpeg import NvJpegLoader
from fastkd.data.order import train_indices
from fastkd.engine.config import parse_args

needs_dali = pytest.mark.skipif(not loaders.dali_available(), reason="nvidia-dali is not installed")
LOADERS = [pytest.param("dali", marks=needs_dali), "torch"]


def smooth_image(height, width, phase):
    y, x = np.mgrid[0:height, 0:width]
    channels = [128 + 100 * np.sin(x / 7 + phase), 128 + 100 * np.cos(y / 9 + phase),
                128 + 60 * np.sin((x + y) / 11)]
    return Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8))


def write_tree(root, classes, train_per_class, val_per_class):
    """``root/{train,val}/<class>/<i>.jpeg`` with smooth images of varying sizes."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for index in range(count):
                image = smooth_image(40 + 8 * index, 60 - 4 * index, label + index / 3)
                image.save(root / split / name / f"{index}.jpeg", quality=95)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"), ["cat", "dog", "emu"], 7, 4)


@pytest.mark.parametrize("kind", LOADERS)
def test_loader_batches(tree, kind):
    train, val = create_loaders("folder", str(tree), batch_size=4, image_size=32, loader=kind,
                                workers=1)
    assert isinstance(train, Loader) and isinstance(val, Loader)
    assert (train.num_classes, train.dataset_size, val.dataset_size) == (3, 21, 12)
    assert (len(train), len(val)) == (21 // 4, 3)  # training: full batches only
    lowest = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    highest = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    seen = 0
    for images, labels in train:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert images.min() >= lowest - 1e-4 and images.max() <= highest + 1e-4
        seen += len(labels)
    assert seen == 20
    first = [(images.clone(), labels.clone()) for images, labels in val]
    second = list(val)
    labels = torch.cat([labels for _, labels in first])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # folder order, deterministic
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_channels_last(tree):
    train, _ = create_loaders("folder", str(tree), batch_size=4, image_size=32, loader="torch",
                              workers=0, channels_last=True)
    images, _ = next(iter(train))
    assert images.is_contiguous(memory_format=torch.channels_last)


@needs_dali
def test_dali_and_torchvision_agree_on_evaluation(tree):
    """Same images, same decode-resize-crop-normalise recipe. They differ in JPEG decoder and
    resize kernel, which on these smooth 40-64 px images moves values by 0.05 on average and up
    to ~0.3 (normalised units, i.e. up to ~18/255): the bounds below allow for that, no more."""
    outputs = {}
    for kind in ("dali", "torch"):
        _, val = create_loaders("folder", str(tree), batch_size=5, image_size=32, loader=kind,
                                workers=1)
        outputs[kind] = torch.cat([images for images, _ in val])
    difference = (outputs["dali"] - outputs["torch"]).abs()
    assert difference.mean() < 0.08
    assert torch.quantile(difference.flatten(), 0.99) < 0.45


@pytest.mark.parametrize("kind", LOADERS)
def test_global_batches_split_across_ranks_and_evaluation_covers_each_sample_once(tmp_path, kind):
    """13 one-image classes, so a label names its sample. Training: batch 2 on 2 ranks takes 3
    global batches of 4 a step, rank r the r-th half of each, as ``order.train_indices`` plans
    (the 13th sample waits for another epoch); evaluation: the 6/7 shards, each image once."""
    root = write_tree(tmp_path, [f"c{index:02d}" for index in range(13)], 1, 1)
    for epoch in range(2):
        seen, evaluated = [], []
        for rank in range(2):
            train, val = create_loaders("folder", str(root), batch_size=2, image_size=16,
                                        loader=kind, rank=rank, world_size=2, workers=1, seed=3)
            train.set_epoch(epoch)
            labels = [labels.tolist() for _, labels in train]
            assert len(labels) == len(train) == 3 and all(len(batch) == 2 for batch in labels)
            seen.append(labels)
            evaluated += torch.cat([labels for _, labels in val]).tolist()
        plan = train_indices(13, seed=3, epoch=epoch, batch_size=2, rank=0, world_size=1)
        assert [index for step in zip(*seen) for half in step for index in half] == plan[:12]
        assert sorted(evaluated) == list(range(13))  # evaluation: each image once, no padding
    assert (train_indices(13, seed=3, epoch=0, batch_size=2, rank=0, world_size=2)
            != train_indices(13, seed=3, epoch=1, batch_size=2, rank=0, world_size=2))


def test_cifar100_reader(tmp_path):
    archive = tmp_path / "cifar-100-python"
    archive.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 6)):
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "fine_labels": list(rng.integers(0, 100, count)), "coarse_labels": [0] * count}
        with open(archive / split, "wb") as handle:
            pickle.dump(entry, handle)
    with open(archive / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, handle)
    train, val = create_loaders("cifar100", str(tmp_path), batch_size=4, workers=0)
    assert (train.dataset_size, val.dataset_size, train.num_classes) == (10, 6, 100)
    images, labels = next(iter(val))
    assert images.shape == (4, 3, 32, 32)
    with open(archive / "test", "rb") as handle:
        expected = pickle.load(handle)
    assert labels.tolist() == [int(label) for label in expected["fine_labels"][:4]]
    first = expected["data"][0].reshape(3, 32, 32).astype(np.float32) / 255
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    normalised = (first - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    torch.testing.assert_close(images[0], torch.from_numpy(normalised).float(), rtol=0, atol=1e-5)
    _, val = create_loaders("cifar100", str(tmp_path), batch_size=4, workers=0,
                            mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    normalised = (first - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array(
        [0.2, 0.25, 0.3])[:, None, None]
    torch.testing.assert_close(next(iter(val))[0][0], torch.from_numpy(normalised).float(),
                               rtol=0, atol=1e-5)
    train224, val224 = create_loaders("cifar100", str(tmp_path), batch_size=2, image_size=224,
                                      workers=0)
    assert next(iter(train224))[0].shape == (2, 3, 224, 224)
    train224, augmented_val224 = create_loaders(
        "cifar100", str(tmp_path), batch_size=2, image_size=224, workers=0,
        auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0)
    assert next(iter(train224))[0].shape == (2, 3, 224, 224)
    assert torch.equal(next(iter(augmented_val224))[0], next(iter(val224))[0])  # train only


def test_demo_dataset_build_reuse_and_rebuild(tmp_path):
    root = str(tmp_path / "digits")
    build_demo_dataset(root)
    train_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(f"{root}/train") for f in fs)
    val_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(f"{root}/val") for f in fs)
    assert len(train_files) + len(val_files) == 1797
    assert len(os.listdir(f"{root}/train")) == 10 and len(val_files) == 355
    with Image.open(train_files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    stamp = os.path.getmtime(train_files[0])
    build_demo_dataset(root)
    assert os.path.getmtime(train_files[0]) == stamp  # complete: reused as is
    os.remove(val_files[3])
    build_demo_dataset(root)
    assert os.path.isfile(val_files[3])  # incomplete: rebuilt
    train, val = create_loaders("demo", root, batch_size=64, loader="torch", workers=0)
    assert (train.dataset_size, val.dataset_size, train.num_classes) == (1442, 355, 10)


def test_the_demo_never_writes_into_a_folder_of_other_files(tmp_path, capsys):
    """A user's own image tree given to --dataset demo is refused, untouched, by the library and
    by the trainer's flags."""
    mine = tmp_path / "mine"
    (mine / "train" / "cats").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    expected = (f"{mine} holds files that are not the demo's (notes.txt, train/cats): --dataset "
                "demo writes its digits there; give a new or empty folder, or --dataset folder "
                "to train on your own images")
    with pytest.raises(ValueError) as error:
        build_demo_dataset(str(mine))
    assert str(error.value) == expected
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "demo", "--data-dir", str(mine)])
    assert f"error: --data-dir {expected}" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["notes.txt", "train"]
    assert os.listdir(mine / "train") == ["cats"]
    empty = tmp_path / "empty"
    empty.mkdir()
    filled = parse_args(["--dataset", "demo", "--data-dir", str(empty)])
    assert filled.data_dir == str(empty)  # the demo's to fill


def test_auto_falls_back_to_torchvision_with_one_log_line(tree, monkeypatch, caplog):
    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    with caplog.at_level("WARNING", logger="fastkd.data"):
        train, _ = create_loaders("folder", str(tree), batch_size=4, image_size=32, workers=0)
    assert isinstance(train, loaders.TorchLoader)
    assert [record.message for record in caplog.records] == [
        "DALI is not installed (pip install 'fastkd[dali]'): using the torchvision loader"]
    with pytest.raises(ValueError, match=r"loader='dali' needs nvidia-dali"):
        create_loaders("folder", str(tree), batch_size=4, loader="dali")
    with pytest.raises(ValueError, match=r"loader='nvjpeg' decodes on a CUDA device; this run's "
                                         r"device is cpu"):
        create_loaders("folder", str(tree), batch_size=4, loader="nvjpeg")


def test_bad_input(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path}/nowhere/train does not exist"):
        create_loaders("folder", str(tmp_path / "nowhere"), batch_size=4)
    empty = write_tree(tmp_path / "empty", ["a", "b"], 2, 2)
    for path in (empty / "val" / "b").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=f"class folders with no images \\(1\\): {empty}/val/b"):
        create_loaders("folder", str(empty), batch_size=4)
    (tmp_path / "bare" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no class sub-directories"):
        create_loaders("folder", str(tmp_path / "bare"), batch_size=4)
    mismatch = write_tree(tmp_path / "mismatch", ["a", "b"], 1, 1)
    (mismatch / "val" / "b").rename(mismatch / "val" / "c")
    with pytest.raises(ValueError, match=r"have different classes: only in train \['b'\], only in val \['c'\]"):
        create_loaders("folder", str(mismatch), batch_size=4)
    broken = write_tree(tmp_path / "broken", ["a"], 2, 1)
    (broken / "train" / "a" / "1.jpeg").write_text("not an image")
    (broken / "val" / "a" / "0.jpeg").write_bytes(b"")
    with pytest.raises(ValueError, match=f"^2 bad image file\\(s\\) \\(bad_images='error'; 'skip' leaves them out\\):\n  {broken}/train/a/1.jpeg: not an image \\(bad header\\)\n  {broken}/val/a/0.jpeg: empty file$"):
        create_loaders("folder", str(broken), batch_size=4, loader="torch", bad_images="error")
    with pytest.raises(ValueError, match=r"bad_images must be one of \('skip', 'error'\), got 'ignore'"):
        create_loaders("folder", str(tmp_path / "nowhere"), batch_size=4, bad_images="ignore")
    with pytest.raises(FileNotFoundError, match=f"no CIFAR-100 archive at {tmp_path}"):
        create_loaders("cifar100", str(tmp_path), batch_size=4)
    with pytest.raises(ValueError, match="dataset 'imagenet' needs data_dir"):
        create_loaders("imagenet", None, batch_size=4)
    with pytest.raises(ValueError, match=r"dataset must be one of .*, got 'mnist'"):
        create_loaders("mnist", str(tree), batch_size=4)
    with pytest.raises(ValueError, match="loader='dali' does not read CIFAR-100"):
        create_loaders("cifar100", str(tmp_path), batch_size=4, loader="dali")


def test_a_class_of_other_formats_is_refused_saying_what_is_read(tmp_path, caplog):
    root = write_tree(tmp_path, ["a", "b"], 1, 1)
    (root / "train" / "b" / "0.jpeg").rename(root / "train" / "b" / "0.tif")
    with caplog.at_level("WARNING", logger="fastkd.data"):
        with pytest.raises(ValueError, match="class folders with no images .+ \\(images are read "
                                             "with the extensions .jpg .jpeg .png .bmp .webp"):
            create_loaders("folder", str(root), batch_size=1, loader="torch", workers=0)
    assert "1 .tif file(s)" in caplog.text  # named before the refusal


def test_what_the_folder_scan_leaves_out_is_named(tmp_path, caplog):
    """Nested folders, files of other formats and files beside the class folders used to be
    skipped silently; hidden files still are."""
    from fastkd.data.folders import scan_image_folder

    root = write_tree(tmp_path, ["a", "b"], 2, 1)
    for name in ("train/a/scan.tif", "train/a/scan.TIFF", "train/b/notes.txt", "train/README",
                 "train/b/.DS_Store"):
        (root / name).write_bytes(b"x")
    (root / "train" / "a" / "more").mkdir()
    with caplog.at_level("WARNING", logger="fastkd.data"):
        folder = scan_image_folder(str(root / "train"))
    assert len(folder.samples) == 4
    message, = [record.getMessage() for record in caplog.records]
    for part in ("1 file(s) beside the class folders", "1 folder(s) inside a class folder",
                 "1 .tif file(s)", "1 .tiff file(s)", "1 .txt file(s)",
                 f"images are read from {root}/train/<class>/"):
        assert part in message, part
    assert ".DS_Store" not in message


def blocked_signals():
    """{thread id: (thread name, mask of the signals it blocks)} of this process's threads."""
    threads = {}
    for thread in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{thread}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        threads[int(thread)] = (fields["Name"].strip(), int(fields["SigBlk"], 16))
    return threads


@needs_dali
def test_dali_threads_block_the_stop_signals(tree):
    """DALI's threads are started by the pipeline and its iterator within
    ``blocked_for_children``: they keep SIGTERM, SIGINT and SIGUSR1 blocked, and the training
    thread (which takes them) does not."""
    from fastkd.signals import STOP_SIGNALS

    stop_mask = sum(1 << (number - 1) for number in STOP_SIGNALS)
    before = blocked_signals()
    train, _ = create_loaders("folder", str(tree), batch_size=4, image_size=16, loader="dali",
                              workers=2)
    next(iter(train))
    started = {thread: (name, mask) for thread, (name, mask) in blocked_signals().items()
               if thread not in before and "DALI" in name}
    assert len(started) >= 2, started  # a thread per worker at least
    assert all(mask & stop_mask == stop_mask for _, mask in started.values()), started
    assert not blocked_signals()[os.getpid()][1] & stop_mask
    train.close()


@needs_dali
def test_a_dropped_dali_loader_takes_its_threads_with_it(tree):
    """Without the garbage collector: a pipeline whose external source referred back to its
    loader lived on in a reference cycle with its threads, and a DataLoader forked beside them
    later hung (a test run stuck in a torch worker's first read)."""
    import gc

    before = set(blocked_signals())
    gc.disable()
    try:
        train, val = create_loaders("folder", str(tree), batch_size=4, image_size=16,
                                    loader="dali", workers=2, auto_augment="v0")
        next(iter(train))
        list(val)
        assert set(blocked_signals()) - before
        del train, val
        assert set(blocked_signals()) - before == set()
    finally:
        gc.enable()


class _Reads(torch.utils.data.Dataset):
    """Ten numbered samples; each read is logged to a file (reads happen in worker processes)."""

    def __init__(self, log):
        self.log = log

    def __len__(self):
        return 10

    def __getitem__(self, index):
        with open(self.log, "a") as handle:
            handle.write(f"{index}\n")
        return torch.tensor([float(index)]), index


def test_loader_workers_start_before_training_without_reading_ahead(tmp_path):
    """``start()`` forks the worker processes (the trainer does it before its first collective)
    and reads nothing: a batch read then would be thrown away with what its worker found."""
    from fastkd.data.torch_loader import TorchLoader

    log = tmp_path / "reads.txt"
    loader = TorchLoader(_Reads(str(log)), 10, training=True, batch_size=2, workers=2)
    loader.start()
    assert loader.loader._iterator is not None and len(loader.loader._iterator._workers) == 2
    time.sleep(0.5)
    assert not log.exists()
    loader.set_epoch(1, start_step=2)
    labels = [labels.tolist() for _, labels in loader]
    plan = train_indices(10, seed=0, epoch=1, batch_size=2, rank=0, world_size=1)
    assert labels == [plan[index:index + 2] for index in range(4, 10, 2)]
    assert sorted(map(int, log.read_text().split())) == sorted(plan[4:])
    loader.close()


def test_synthetic_and_nvjpeg_loaders_have_the_loader_interface(tree):
    """The other two kinds (``test_loader_batches`` checks DALI's and torchvision's)."""
    synthetic = create_loaders("synthetic", batch_size=4, image_size=8, num_classes=3,
                               synthetic_samples=8)
    samples = create_loaders("folder", str(tree), batch_size=4, image_size=32, loader="torch",
                             workers=0)[0].dataset.samples
    nvjpeg = NvJpegLoader(samples, 3, training=True, batch_size=4, image_size=32,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_ratio=0.875, workers=0)
    assert all(isinstance(loader, Loader) for loader in (*synthetic, nvjpeg))
