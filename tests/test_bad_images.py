"""Bad image files on both loaders, written as real files: a truncated JPEG, an empty file, JPEG
headers followed by random bytes, JPEG headers alone (bad: skipped and replaced, or an error
naming every one); a PNG named .jpg, grayscale, CMYK and 1x1 JPEGs (fine: 3-channel tensors).
Also the verification pass that runs before DALI, its cache, and ``fastkd-verify-data``."""

import io
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import LOADERS, needs_dali, smooth_image, write_tree
from torchvision import transforms

from fastkd.data import verify
from fastkd.data.bad_images import BadImageError
from fastkd.data.loaders import create_loaders
from fastkd.data.torch_loader import FileDataset
from fastkd.data.verify import CACHE_NAME, main, verify_images


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


PHOTO = smooth_image(48, 64, 0.5)
GOOD_JPEG = jpeg_bytes(PHOTO)
SCAN = GOOD_JPEG.index(b"\xff\xda")  # start-of-scan marker: every byte before it is headers
SCAN_DATA = SCAN + 2 + int.from_bytes(GOOD_JPEG[SCAN + 2:SCAN + 4], "big")
NOISE = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
BAD_FILES = {
    "cut.jpg": GOOD_JPEG[:len(GOOD_JPEG) // 2],
    "empty.jpg": b"",
    "noise.jpg": GOOD_JPEG[:SCAN_DATA] + NOISE,
    "headers.jpg": GOOD_JPEG[:SCAN],
}
PNG = io.BytesIO()
PHOTO.save(PNG, format="PNG")
FINE_FILES = {
    "png.jpg": PNG.getvalue(),
    "gray.jpg": jpeg_bytes(PHOTO.convert("L")),
    "cmyk.jpg": jpeg_bytes(PHOTO.convert("CMYK")),
    "tiny.jpg": jpeg_bytes(Image.new("RGB", (1, 1), (200, 30, 60))),
}


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """train: a/{0,1,2}.jpeg + the four bad files, b/{0,1,2}.jpeg + the four fine odd ones +
    zz-cut.jpg (bad, last of the split: its replacement wraps round); val: a/0, a/1, a/cut (bad),
    b/0, b/1, b/zz-noise (bad, last)."""
    root = write_tree(tmp_path_factory.mktemp("odd"), ["a", "b"], 3, 2)
    files = {**{f"train/a/{name}": data for name, data in BAD_FILES.items()},
             **{f"train/b/{name}": data for name, data in FINE_FILES.items()},
             "train/b/zz-cut.jpg": BAD_FILES["cut.jpg"], "val/a/cut.jpg": BAD_FILES["cut.jpg"],
             "val/b/zz-noise.jpg": BAD_FILES["noise.jpg"]}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def expected_bad(root, split):
    """{path: reason pattern} of the split's bad files."""
    names = {"train": ["a/cut.jpg", "a/empty.jpg", "a/headers.jpg", "a/noise.jpg", "b/zz-cut.jpg"],
             "val": ["a/cut.jpg", "b/zz-noise.jpg"]}[split]
    return {f"{root}/{split}/{name}": "empty file" if "empty" in name else "OSError: .+"
            for name in names}


def assert_reasons(bad, expected):
    assert sorted(bad) == sorted(expected)
    for path, pattern in expected.items():
        assert re.fullmatch(pattern, bad[path]), (path, bad[path])


def logged_bad(caplog):
    """{path: reason} of the 'skipping bad image' warnings; each file in one warning only."""
    named = [record.args for record in caplog.records
             if record.levelname == "WARNING" and record.msg.startswith("skipping bad image")]
    assert len(named) == len(dict(named))
    return dict(named)


def test_fine_odd_files_decode_to_three_channels(tmp_path):
    for name, data in FINE_FILES.items():
        (tmp_path / name).write_bytes(data)
    dataset = FileDataset([(str(tmp_path / name), 7) for name in FINE_FILES], transforms.ToTensor())
    for index, name in enumerate(FINE_FILES):
        image, label, bad = dataset[index]
        assert (image.shape[0], label, bad) == (3, 7, {}), name
    gray = dataset[list(FINE_FILES).index("gray.jpg")][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_torchvision_loader_skips_and_replaces_bad_files(odd_tree, caplog):
    with caplog.at_level("WARNING", logger="fastkd.data"):
        train, val = create_loaders("folder", str(odd_tree), batch_size=2, image_size=32,
                                    loader="torch", workers=1, eval_batch_size=4)
        # The header scan already left the empty file out; the rest are found while reading.
        assert train.dataset_size == 14 and val.dataset_size == 6
        assert list(train.bad_images) == [f"{odd_tree}/train/a/empty.jpg"]
        for epoch in range(2):
            train.set_epoch(epoch)
            seen = 0
            for images, labels in train:
                assert images.shape[1:] == (3, 32, 32) and torch.isfinite(images).all()
                seen += len(labels)
            assert seen == 14  # each bad sample replaced: the epoch keeps its sample count
            assert_reasons(train.bad_images, expected_bad(odd_tree, "train"))
        batches = list(val)
    assert_reasons(logged_bad(caplog), {**expected_bad(odd_tree, "train"),
                                        **expected_bad(odd_tree, "val")})
    # Evaluation order is the file order: a bad file is replaced by the next readable one, with
    # that one's label, and the last one wraps round to the first.
    images = torch.cat([images for images, _ in batches])
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 0, 1, 1, 1, 0]
    assert torch.equal(images[2], images[3]) and torch.equal(images[5], images[0])
    assert_reasons(val.bad_images, expected_bad(odd_tree, "val"))


def test_torchvision_loader_excludes_files_found_by_other_ranks(odd_tree, caplog):
    _, val = create_loaders("folder", str(odd_tree), batch_size=6, image_size=32,
                            loader="torch", workers=1)
    elsewhere = f"{odd_tree}/val/a/1.jpeg"  # readable: replaced only because it is excluded
    val.exclude({elsewhere: "found bad on rank 1"})
    with caplog.at_level("WARNING", logger="fastkd.data"):
        images, labels = next(iter(val))
    assert labels.tolist() == [0, 1, 1, 1, 1, 0]  # a/1 -> a/cut (bad) -> b/0, and a/cut -> b/0
    assert torch.equal(images[1], images[3]) and torch.equal(images[2], images[3])
    assert val.bad_images[elsewhere] == "found bad on rank 1"
    assert_reasons({path: reason for path, reason in val.bad_images.items() if path != elsewhere},
                   expected_bad(odd_tree, "val"))
    assert elsewhere not in logged_bad(caplog)  # the rank that found it logged it


def test_torchvision_loader_error_names_a_file_that_breaks_during_the_run(tmp_path):
    root = write_tree(tmp_path, ["a"], 2, 1)
    train, _ = create_loaders("folder", str(root), batch_size=2, image_size=32, loader="torch",
                              workers=1, bad_images="error")
    (root / "train" / "a" / "1.jpeg").write_bytes(BAD_FILES["cut.jpg"])  # after the check
    with pytest.raises(BadImageError, match=f"{root}/train/a/1.jpeg: OSError: .+ \\(bad_images=.error.; fastkd-verify-data lists every bad file\\)"):
        list(train)
    train.close()  # its worker, else stopped when collected in a later test (a 5 s join there)


@needs_dali
def test_dali_loader_leaves_bad_files_out(odd_tree, caplog):
    (odd_tree / CACHE_NAME).unlink(missing_ok=True)  # whichever test ran first
    with caplog.at_level("INFO", logger="fastkd.data"):
        train, val = create_loaders("folder", str(odd_tree), batch_size=2, image_size=32,
                                    loader="dali", workers=1, eval_batch_size=4)
    assert_reasons(train.bad_images, expected_bad(odd_tree, "train"))
    assert_reasons(val.bad_images, expected_bad(odd_tree, "val"))
    assert logged_bad(caplog) == {**train.bad_images, **val.bad_images}
    assert "verified 20 images: 6 bad, 20 decoded, 0 cached" in caplog.text
    assert (train.dataset_size, val.dataset_size) == (10, 4)
    seen = 0
    for images, labels in train:  # the fine odd files among them
        assert images.shape[1:] == (3, 32, 32) and torch.isfinite(images).all()
        seen += len(labels)
    assert seen == 10
    assert torch.cat([labels for _, labels in val]).tolist() == [0, 0, 1, 1]  # folder labels
    val.exclude({f"{odd_tree}/val/a/1.jpeg": "found bad on rank 1"})
    assert val.bad_images[f"{odd_tree}/val/a/1.jpeg"] == "found bad on rank 1"
    caplog.clear()
    with caplog.at_level("INFO", logger="fastkd.data"):
        create_loaders("folder", str(odd_tree), batch_size=4, loader="dali", workers=1)
    assert "verified 20 images: 6 bad, 0 decoded, 20 cached" in caplog.text  # once per dataset


@pytest.mark.parametrize("loader", LOADERS)
def test_error_names_every_bad_file_before_the_run(odd_tree, loader):
    with pytest.raises(BadImageError) as raised:
        create_loaders("folder", str(odd_tree), batch_size=4, loader=loader, workers=1,
                       bad_images="error")
    lines = str(raised.value).splitlines()
    assert lines[0] == "7 bad image file(s) (bad_images='error'; 'skip' leaves them out):"
    listed = dict(line.strip().split(": ", 1) for line in lines[1:])
    assert_reasons(listed, {**expected_bad(odd_tree, "train"), **expected_bad(odd_tree, "val")})


def test_verification_cache(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "data", ["a"], 3, 1)
    paths = sorted(str(path) for path in root.glob("*/a/*.jpeg"))
    first = verify_images(root, paths, workers=1)
    assert (first.checked, first.decoded, first.bad) == (4, 4, {})
    with open(first.cache) as handle:
        cache = json.load(handle)
    assert first.cache == f"{root}/{CACHE_NAME}" and cache["root"] == str(root)
    size, mtime = os.path.getsize(paths[0]), os.stat(paths[0]).st_mtime_ns
    assert cache["files"]["train/a/0.jpeg"] == [size, mtime, None]
    # Break a file but keep its size and mtime: the result comes from the cache, not a decode.
    with open(paths[0], "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * (size - size // 2))
    os.utime(paths[0], ns=(mtime, mtime))
    second = verify_images(root, paths, workers=1)
    assert (second.decoded, second.cached, second.bad) == (0, 4, {})
    os.utime(paths[0], ns=(mtime + 1, mtime + 1))  # touched: decoded again, found bad
    third = verify_images(root, paths, workers=0)
    assert third.decoded == 1 and list(third.bad) == [paths[0]]
    (root / "train" / "a" / "3.jpeg").write_bytes(GOOD_JPEG)  # a new file
    fourth = verify_images(root, [*paths, str(root / "train" / "a" / "3.jpeg")], workers=0)
    assert (fourth.decoded, fourth.cached, list(fourth.bad)) == (1, 4, [paths[0]])

    # A read-only dataset: the cache goes to the user cache, keyed by the folder's path.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **options: (
        os.path.abspath(path) != str(root) and real_access(path, mode, **options)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    elsewhere = verify_images(root, paths, workers=0)
    assert os.path.dirname(elsewhere.cache) == str(tmp_path / "user-cache" / "fastkd" / "verified")
    assert elsewhere.decoded == 4 and verify_images(root, paths, workers=0).decoded == 0


def test_ranks_that_start_together_decode_once(tmp_path, monkeypatch):
    """Both find the files missing from the cache, then queue for the lock: the second to get it
    reads the results the first wrote."""
    root = write_tree(tmp_path, ["a", "b"], 3, 1)
    paths = sorted(str(path) for path in root.glob("*/*/*.jpeg"))
    both_looked = threading.Barrier(2)
    locked = verify._locked

    def lock_after_both_looked(cache):
        both_looked.wait(timeout=30)
        return locked(cache)

    monkeypatch.setattr(verify, "_locked", lock_after_both_looked)
    with ThreadPoolExecutor(2) as ranks:
        results = list(ranks.map(lambda _: verify_images(root, paths, workers=0), range(2)))
    assert sorted(result.decoded for result in results) == [0, 8]


def run_cli(*arguments):
    return subprocess.run([sys.executable, "-m", "fastkd.data.verify", *arguments],
                          capture_output=True, text=True, timeout=120)


def test_verify_data_command(odd_tree, tmp_path, capsys):
    found = run_cli(str(odd_tree), "-j", "2")
    assert found.returncode == 1, found.stderr
    *listed, summary = found.stdout.splitlines()
    bad = {**expected_bad(odd_tree, "train"), **expected_bad(odd_tree, "val")}
    assert [line.split(": ", 1)[0] for line in listed] == sorted(bad)
    assert_reasons(dict(line.split(": ", 1) for line in listed), bad)
    assert re.fullmatch(
        rf"21 files checked, 7 bad, \d+ files/s, \d+ cached \({odd_tree}/{CACHE_NAME}\)", summary)

    clean = write_tree(tmp_path, ["a", "b"], 2, 1) / "train"  # one class-folder tree
    passed = run_cli(str(clean), "--workers", "1")
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.startswith("4 files checked, 0 bad, ")
    assert passed.stdout.endswith(f" files/s, 0 cached ({clean}/{CACHE_NAME})\n")
    for arguments, message in (([str(tmp_path / "nowhere")], "does not exist"),
                               ([str(clean), "-j", "-1"], "--workers must be 0 or more")):
        with pytest.raises(SystemExit) as exited:
            main(arguments)
        assert exited.value.code == 2 and message in capsys.readouterr().err
