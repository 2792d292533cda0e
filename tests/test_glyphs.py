"""The glyph dataset (fastkd/data/glyphs.py): a pure function of its seed, fonts disjoint across
splits, the tree's shape, refusal of foreign folders, rebuild of half-written trees, and the
real loader reading it."""

import hashlib
import json
import os
import time

import pytest
from PIL import Image, ImageFont
from trainer_helpers import MODEL

from fastkd.data import glyphs
from fastkd.data.glyphs import MANIFEST, build_glyph_dataset

SMALL = {"train": 2, "val": 1, "test": 1}  # images per class and split: 400 files, ~0.3 s


def tree_digests(root):
    """{relative path: sha256} of every file under ``root``."""
    digests = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digests[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def manifest(root):
    with open(os.path.join(root, MANIFEST)) as handle:
        return json.load(handle)


# The default tree's size in this module: each split's fonts once a class (14, 4 and 4 of them:
# 2,200 files, where PER_CLASS's 60, 15 and 15 make 9,000). The size changes the counts alone.
TREE = {split: len(fonts) for split, fonts in glyphs.FONT_SPLITS.items()}


@pytest.fixture(scope="module")
def default_tree(tmp_path_factory):
    """The default tree, built once, with ``PER_CLASS`` set to ``TREE`` while this module's tests
    use it (the loaders and the trainer build, or reuse, the default tree); its build time is
    printed (not asserted: speed belongs in the benchmarks)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(glyphs, "PER_CLASS", TREE)
        root = str(tmp_path_factory.mktemp("glyphs"))
        start = time.perf_counter()
        build_glyph_dataset(root)
        print(f"glyph dataset built in {time.perf_counter() - start:.1f} s")
        yield root


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = build_glyph_dataset(str(tmp_path / "a"), seed=3, per_class=SMALL)
    second = build_glyph_dataset(str(tmp_path / "b"), seed=3, per_class=SMALL)
    other = build_glyph_dataset(str(tmp_path / "c"), seed=4, per_class=SMALL)
    assert tree_digests(first) == tree_digests(second)
    images_first = {k: v for k, v in tree_digests(first).items() if k.endswith(".jpeg")}
    images_other = {k: v for k, v in tree_digests(other).items() if k.endswith(".jpeg")}
    assert images_first.keys() == images_other.keys()
    # Another seed draws other distortions: (nearly) every image differs.
    same = sum(images_first[name] == images_other[name] for name in images_first)
    assert same < len(images_first) / 100


def test_tree_shape_classes_and_counts(default_tree):
    recorded = manifest(default_tree)
    per_class = TREE
    assert recorded["per_class"] == per_class
    classes = recorded["classes"]
    assert len(classes) == 100
    # Folder names are the texts' code points, ASCII only: safe on every filesystem.
    for folder, text in classes.items():
        assert folder.isascii() and "/" not in folder and "\\" not in folder
        assert "".join(chr(int(part[2:], 16)) for part in folder.split("_")) == text
    texts = set(classes.values())
    assert set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") <= texts
    assert {"O", "0", "o", "Q", "l", "1", "I", "|", "S", "5", "s", "$", "rn", "m"} <= texts
    files = [name for name in recorded["files"]]
    assert len(files) == len(set(files)) == 100 * sum(per_class.values())
    for split in glyphs.SPLITS:
        folders = sorted(os.listdir(os.path.join(default_tree, split)))
        assert folders == sorted(classes)
        for folder in folders:
            names = os.listdir(os.path.join(default_tree, split, folder))
            assert len(names) == per_class[split]
            assert all(f"{split}/{folder}/{name}" in recorded["files"] for name in names)


def test_fonts_are_disjoint_across_splits(default_tree):
    recorded = manifest(default_tree)
    fonts = {split: set(names) for split, names in recorded["fonts"].items()}
    assert set(fonts) == set(glyphs.SPLITS)
    assert not fonts["train"] & fonts["val"]
    assert not fonts["train"] & fonts["test"]
    assert not fonts["val"] & fonts["test"]
    shipped = {name[:-4] for name in os.listdir(glyphs.font_dir()) if name.endswith(".ttf")}
    assert set.union(*fonts.values()) <= shipped
    # Each file's font is one of its split's; every font of a split is used.
    used = {split: set() for split in fonts}
    for name, font in recorded["files"].items():
        split = name.split("/")[0]
        assert font in fonts[split], name
        used[split].add(font)
    assert used == fonts


def test_every_used_glyph_has_ink_and_wrong_encodings_are_left_out():
    """A (font, character) pair in use draws something (PIL's mask has a bounding box), and
    the fonts whose code points hold other glyphs are not used for them: Computer Modern's TeX
    text encoding has the inverted exclamation mark at '<', cmmi10 has old-style digits."""
    for split in glyphs.SPLITS:
        for text in glyphs.TEXT:
            for font in glyphs.fonts_for(text, split):
                face = ImageFont.truetype(os.path.join(glyphs.font_dir(), font + ".ttf"), 40)
                assert face.getmask(text).getbbox() is not None, (font, text)
    assert "<" not in glyphs.covered("cmr10")
    assert not set("0123456789") & glyphs.covered("cmmi10")
    assert set("0123456789") <= glyphs.covered("cmr10")


def test_images_decode_as_32px_rgb_jpegs(tmp_path):
    root = build_glyph_dataset(str(tmp_path / "g"), per_class=SMALL)
    for name in manifest(root)["files"]:
        with Image.open(os.path.join(root, name)) as image:
            assert image.format == "JPEG"
            assert image.size == (32, 32) and image.mode == "RGB"
            image.load()


def test_a_foreign_folder_is_refused_with_nothing_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "train" / "cats").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    before = tree_digests(str(mine)), sorted(os.walk(str(mine)))
    with pytest.raises(ValueError, match="not the glyph dataset's"):
        build_glyph_dataset(str(mine), per_class=SMALL)
    assert (tree_digests(str(mine)), sorted(os.walk(str(mine)))) == before
    # The trainer's command line refuses it before anything runs.
    from fastkd.engine.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--dataset", "glyphs", "--distiller", "ce", "--data-dir", str(mine)])
    assert "holds files that are not the glyph dataset's" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    args = parse_args(["--dataset", "glyphs", "--distiller", "ce", "--data-dir", str(empty)])
    assert args.data_dir == str(empty)
    # A new folder too (README: --data-dir DIR writes the glyphs into DIR); parsing writes none.
    new = tmp_path / "new" / "glyphs"
    for dataset in ("glyphs", "demo"):
        args = parse_args(["--dataset", dataset, "--distiller", "ce", "--data-dir", str(new)])
        assert args.data_dir == str(new) and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):  # a file is not a folder, for these datasets too
        parse_args(["--dataset", "glyphs", "--distiller", "ce", "--data-dir",
                    str(mine / "notes.txt")])
    assert f"--data-dir {mine / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err


def test_a_half_written_tree_is_rebuilt(tmp_path):
    root = build_glyph_dataset(str(tmp_path / "g"), per_class=SMALL)
    whole = tree_digests(root)
    # A build stopped part-way: no manifest yet, a file cut short, another missing.
    names = sorted(manifest(root)["files"])
    os.remove(os.path.join(root, MANIFEST))
    with open(os.path.join(root, names[5]), "r+b") as handle:
        handle.truncate(10)
    os.remove(os.path.join(root, names[-1]))
    build_glyph_dataset(root, per_class=SMALL)
    assert tree_digests(root) == whole
    # A complete tree is reused as it is; one file gone makes it rebuilt.
    stamp = os.stat(os.path.join(root, names[0])).st_mtime_ns
    build_glyph_dataset(root, per_class=SMALL)
    assert os.stat(os.path.join(root, names[0])).st_mtime_ns == stamp
    os.remove(os.path.join(root, names[7]))
    build_glyph_dataset(root, per_class=SMALL)
    assert tree_digests(root) == whole


def test_the_torch_loader_reads_the_tree(default_tree):
    import torch

    from fastkd.data.loaders import create_loaders

    train, val = create_loaders("glyphs", default_tree, batch_size=50, loader="torch", workers=0)
    assert train.num_classes == val.num_classes == 100
    assert train.dataset_size == 100 * TREE["train"]
    assert val.dataset_size == 100 * TREE["val"]
    train.set_epoch(0)
    images, labels = next(iter(train))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 100
    seen = torch.cat([labels for _, labels in val])
    # Evaluation reads every validation image once: each class TREE["val"] times.
    assert torch.bincount(seen, minlength=100).tolist() == [TREE["val"]] * 100


def test_evaluation_reads_the_split_asked_for(default_tree):
    """``val_split="test"``: the evaluation loader reads the test fonts' files, and only those."""
    from fastkd.data.loaders import create_loaders

    files = manifest(default_tree)["files"]
    read = {}
    for split in ("val", "test"):
        _, evaluation = create_loaders("glyphs", default_tree, batch_size=50, loader="torch",
                                       workers=0, val_split=split)
        read[split] = sorted(os.path.relpath(path, default_tree)
                             for path, _ in evaluation.dataset.samples)
        assert read[split] == sorted(name for name in files if name.startswith(f"{split}/"))
        assert {files[name] for name in read[split]} <= set(glyphs.FONT_SPLITS[split])
    assert evaluation.dataset_size == 100 * TREE["test"]
    with pytest.raises(ValueError, match="val_split 'train' is the training split"):
        create_loaders("glyphs", default_tree, batch_size=50, loader="torch", val_split="train")


def test_eval_only_scores_the_split_asked_for(default_tree, tmp_path):
    """``--eval-only --val-split test``: the trainer's score is the model's on the test loader."""
    import timm

    from fastkd.data.loaders import create_loaders
    from fastkd.engine.checkpoint import save_atomic
    from fastkd.engine.config import parse_args
    from fastkd.engine.distributed import World
    from fastkd.engine.evaluate import evaluate
    from fastkd.engine.optim import Autocast
    from fastkd.engine.trainer import run_job
    from fastkd.models import data_config

    model = timm.create_model(MODEL, num_classes=100)
    path = str(tmp_path / "last.pth")
    save_atomic({"state_dict": model.state_dict(),
                 "args": {"model": MODEL, "model_kwargs": {}, "num_classes": 100,
                          "img_size": 32, "input_size": None, "distiller": "ce"}}, path)
    world = World()
    scores = run_job(parse_args(["--eval-only", path, "--dataset", "glyphs", "--data-dir",
                                 default_tree, "--val-split", "test", "--workers", "0",
                                 "--loader", "torch"]), world)
    config = data_config(MODEL)
    _, test = create_loaders("glyphs", default_tree, batch_size=128, loader="torch", workers=0,
                             mean=config["mean"], std=config["std"], val_split="test")
    expected = evaluate(model, test, world, Autocast(False))
    assert scores["student"] == pytest.approx(expected)
