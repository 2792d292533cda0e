"""The teacher-output cache: its files, the builder (plain, resumed under torchrun), the
trainer's cached runs against live ones, and every refusal."""

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import timm
import torch
from trainer_helpers import FAST, MODEL, in_process

from fastkd.data.loaders import create_loaders
from fastkd.distillers import build_distiller
from fastkd.engine.cli import cache_teacher, main
from fastkd.engine.config import build_cache_parser
from fastkd.engine.optim import cpu_has_bf16
from fastkd.engine.teacher_cache import (
    CacheError,
    TeacherCache,
    sha256_of,
    write_json,
    write_shard,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- the files ---------------------------------------------------------------------------------
def write_cache(directory, views, dtype, shard_rows=3, samples=8, classes=5, embedding=None):
    """A cache of random rows written by ``write_shard``, with its manifest; returns the rows
    ``{view: {"logits": [samples, classes], ...}}``."""
    generator = torch.Generator().manual_seed(0)
    rows, records = {}, []
    for view in range(views):
        rows[view] = {"logits": torch.randn(samples, classes, generator=generator) * 10}
        if embedding:
            rows[view]["embedding"] = torch.randn(samples, embedding, generator=generator)
        for first in range(0, samples, shard_rows):
            records.append(write_shard(directory, view, first, {
                name: value[first:first + shard_rows] for name, value in rows[view].items()},
                dtype))
    write_json(os.path.join(directory, "manifest.json"),
               {"format": 1, "views": views, "dtype": dtype, "shard_rows": shard_rows, "shards": records,
                "embedding": embedding})
    return rows


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_read_back_as_written_rounded_to_the_cache_dtype(tmp_path, dtype):
    rows = write_cache(str(tmp_path), views=2, dtype=dtype, embedding=4)
    cache = TeacherCache(str(tmp_path))
    cache.open_views(range(2))
    slots = [7, 0, 3, 3, 5, 1]  # across shards of 3, out of order, repeated
    for view in range(2):
        outputs = cache.rows(view, slots)
        assert outputs.logits.dtype == getattr(torch, dtype)
        for name in ("logits", "embedding"):
            expected = rows[view][name][slots].to(getattr(torch, dtype))
            assert torch.equal(getattr(outputs, name), expected)


def test_nan_is_never_cached(tmp_path):
    logits = torch.zeros(4, 3)
    logits[2, 1] = float("nan")
    with pytest.raises(CacheError, match=r"logits for sample 12 \(view 1\) are NaN"):
        write_shard(str(tmp_path), 1, 10, {"logits": logits}, "float16")
    assert not os.listdir(tmp_path / "view-1")  # nothing half-written


def damaged(directory, how):
    """Damage view 0's first logits file of the cache in ``directory``: truncate it, flip a byte
    (same size) or write NaN into it with a manifest that vouches for it."""
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["shards"][0]["files"]["logits"]
    path = directory / entry["file"]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-6])
    elif how == "corrupt":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        array = np.load(path)
        array[0, 0] = np.nan
        np.save(path, array)
        entry.update(bytes=os.path.getsize(path), sha256=sha256_of(path))
        (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


@pytest.mark.parametrize("how, message", [
    ("truncated", r"is \d+ bytes, the manifest says \d+ \(truncated or replaced\)"),
    ("corrupt", "does not match its sha256 in the manifest"),
    ("nan", "holds NaN")])
def test_a_damaged_shard_is_refused_naming_the_file(tmp_path, how, message):
    write_cache(str(tmp_path), views=1, dtype="float16")
    path = damaged(tmp_path, how)
    with pytest.raises(CacheError, match=f"{re.escape(path)} {message}"):
        TeacherCache(str(tmp_path)).open_views([0])


# -- the distillers ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "hcd"])
def test_given_teacher_outputs_stand_in_for_the_teacher(method):
    import fastkd  # noqa: F401  (the CIFAR nets)

    torch.manual_seed(0)
    student, teacher = timm.create_model("resnet8x4", num_classes=10), timm.create_model(
        "resnet8x4", num_classes=10)
    images, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    live = build_distiller(method, student, teacher).eval()
    outputs = live.run_teacher(images)
    cached = build_distiller(method, student, None,
                             **({"teacher_width": teacher.num_features} if method == "hcd"
                                else {})).eval()
    cached.load_state_dict(live.state_dict(), strict=False)
    expected, got = live(images, target), cached(images, target, teacher_outputs=outputs)
    assert set(expected) == set(got)
    for name in set(expected) - {"output"}:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


# -- the loaders -------------------------------------------------------------------------------
def test_chosen_slots_and_augment_views_draw_the_training_epochs_augmentations(demo_dir):
    def loader(**settings):
        train, _ = create_loaders("demo", demo_dir, batch_size=8, loader="torch", workers=0,
                                  seed=5, **settings)
        return train

    def epoch_images(train, epoch, slots=None):
        train.set_epoch(epoch, slots=slots)
        return torch.cat([images for images, _ in train])

    from fastkd.data.order import train_indices

    plain, views = loader(), loader(augment_views=2)
    order = train_indices(plain.dataset_size, seed=5, epoch=1, batch_size=8, rank=0,
                          world_size=1)
    trained = epoch_images(plain, 1)
    # What the builder reads for view 1 of those samples is what epoch 1 trained on.
    assert torch.equal(epoch_images(plain, 1, slots=order), trained)
    # Epoch 3 with 2 views: epoch 1's augmentations of each sample, in epoch 3's order.
    order3 = train_indices(plain.dataset_size, seed=5, epoch=3, batch_size=8, rank=0,
                           world_size=1)
    assert order3 != order
    assert torch.equal(epoch_images(views, 3), epoch_images(plain, 1, slots=order3))
    assert not torch.equal(epoch_images(plain, 3), epoch_images(plain, 1, slots=order3))


# -- the builder and the trainer ---------------------------------------------------------------
def run_settings(demo_dir, teacher_checkpoint, loader):
    """The data, teacher and augmentation flags a cache and its runs share."""
    return ["--dataset", "demo", "--data-dir", demo_dir, "--teacher", MODEL,
            "--teacher-checkpoint", teacher_checkpoint, *FAST, "--loader", loader,
            "--batch-size", "32", "--epochs", "2", "--seed", "3"]


def build_caches(demo_dir, teacher_checkpoint, root):
    """Float32 caches of 2 views, built in this process: ``{name: folder}``, one per loader
    (``"torch"``, ``"dali"``) and ``"hcd"`` (torch, with the teacher's embedding); conftest's
    ``built_caches``."""
    folders = {}
    for name, loader, extra in (("torch", "torch", []), ("dali", "dali", []),
                                ("hcd", "torch", ["--distiller", "hcd"])):
        folder = str(root / name)
        result = in_process([*run_settings(demo_dir, teacher_checkpoint, loader), *extra,
                             "--teacher-cache", folder, "--cache-dtype", "float32"],
                            cache_teacher)
        assert result.returncode == 0, result.stderr[-3000:]
        folders[name] = folder
    return folders


def step_lines(output):
    """Each step's logged loss parts (``--log-interval 1``), as printed."""
    return re.findall(r"epoch \d+ \[\d+/\d+\] (.*?) lr", output)


def trained_steps(result, folder):
    """Each step's logged loss parts, then summary.csv's rows, then the logged teacher accuracy
    (top-1, top-5) of a run of ``train/main.py`` that ended as ``result``."""
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(folder, "summary.csv")) as handle:
        rows = list(csv.DictReader(handle))
    teacher = re.search(rf"teacher {MODEL}: top-1 ([\d.]+) top-5 ([\d.]+)", result.stdout)
    return step_lines(result.stdout), rows, teacher and teacher.groups()


PART = {"kd": "train_kd", "dkd": "train_kd", "ldrld": "train_local", "hcd": "train_sdd"}


def run_arguments(demo_dir, teacher_checkpoint, loader, distiller, output, experiment, *extra):
    return [*run_settings(demo_dir, teacher_checkpoint, loader), *extra, "--distiller",
            distiller, "--log-interval", "1", "--output", output, "--experiment", experiment]


def two_process_jobs(inputs):
    """A live and a cached KD run under torchrun, and a killed build resumed under torchrun
    (conftest's one launch)."""
    jobs = {f"kd-{name}": run_arguments(inputs.demo_dir, inputs.teacher_checkpoint, "torch",
                                        "kd", inputs.output(f"kd-{name}"), name, *extra)
            for name, extra in (("live", []),
                                ("cached", ["--teacher-cache", inputs.caches["torch"]]))}
    # What a kill after view 0 leaves: view 1 never finished, no manifest.
    resumed = inputs.output("resumed-cache")
    shutil.copytree(inputs.caches["torch"], resumed)
    shutil.rmtree(os.path.join(resumed, "view-1"))
    os.remove(os.path.join(resumed, "manifest.json"))
    jobs["resumed-cache"] = ("cache_teacher", [
        *run_settings(inputs.demo_dir, inputs.teacher_checkpoint, "torch"), "--teacher-cache",
        resumed, "--cache-dtype", "float32"])
    return jobs


@pytest.mark.parametrize("distiller, cache, processes, options", [
    ("kd", "torch", 1, []), ("ldrld", "dali", 1, []), ("hcd", "hcd", 1, []),
    ("kd", "torch", 2, []), ("dkd", "torch", 1, ["--augment-views", "1"])],
    ids=["kd", "ldrld-dali", "hcd", "kd-2-processes", "dkd-augment-views-1"])
def test_a_cached_run_trains_as_the_live_one(built_caches, demo_dir, teacher_checkpoint,
                                            two_process_jobs, tmp_path, distiller, cache,
                                            processes, options):
    """Per step and per epoch, the losses of a run reading a float32 cache are a live run's
    (the teacher's rows differ only by the rounding of another batch composition); with
    ``--augment-views 1`` both runs' second epoch draws the first's augmentations."""
    loader = "dali" if cache == "dali" else "torch"
    runs = {}
    for name, extra in (("live", []), ("cached", ["--teacher-cache", built_caches[cache]])):
        if processes == 2:  # two_process_jobs above
            result, output = two_process_jobs(f"kd-{name}")
        else:
            output = str(tmp_path)
            result = in_process(run_arguments(demo_dir, teacher_checkpoint, loader, distiller,
                                              output, name, *extra, *options))
        runs[name] = trained_steps(result, os.path.join(output, name))
    (live_steps, live_rows, live_teacher), (cached_steps, cached_rows, cached_teacher) = (
        runs["live"], runs["cached"])
    # The teacher's accuracy is the build's measurement, logged and checked as a live run's.
    assert cached_teacher == live_teacher and live_teacher is not None
    steps_per_epoch = 240 // (32 * processes)
    assert len(live_steps) == 2 * steps_per_epoch and cached_steps == live_steps
    for live, cached in zip(live_rows, cached_rows, strict=True):
        for column in ("train_loss", PART[distiller], "eval_loss"):
            assert float(cached[column]) == pytest.approx(float(live[column]), rel=1e-5)


def test_a_killed_build_resumes_under_torchrun_to_the_same_files(built_caches,
                                                                 two_process_jobs):
    whole = built_caches["torch"]
    result, resumed = two_process_jobs("resumed-cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in 2 shards (1 done before)" in result.stdout
    shards = [json.loads(open(os.path.join(folder, "manifest.json")).read())["shards"]
              for folder in (whole, resumed)]
    # The second process's view-1 rows were computed in batches of another composition: equal
    # within float32 rounding, so the files are compared as arrays.
    assert [shard["first"] for shard in shards[0]] == [shard["first"] for shard in shards[1]]
    for shard in shards[0]:
        path = shard["files"]["logits"]["file"]
        np.testing.assert_allclose(np.load(os.path.join(resumed, path)),
                                   np.load(os.path.join(whole, path)), rtol=1e-5, atol=1e-5)


def test_a_finished_cache_is_extended_with_more_views(built_caches, demo_dir,
                                                     teacher_checkpoint, tmp_path):
    """Building more views into a finished cache computes only the new ones (the old files and
    their records stay) and then serves the longer run; asking for fewer is nothing to do."""
    folder = str(tmp_path / "cache")
    shutil.copytree(built_caches["torch"], folder)
    settings = [*run_settings(demo_dir, teacher_checkpoint, "torch"), "--teacher-cache", folder,
                "--cache-dtype", "float32"]
    result = in_process([*settings, "--epochs", "3"], cache_teacher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds 2 views: extending it to 3" in result.stdout
    assert "in 3 shards (2 done before)" in result.stdout
    before, after = (json.loads(open(os.path.join(path, "manifest.json")).read())
                     for path in (built_caches["torch"], folder))
    assert after["views"] == 3 and after["shards"][:2] == before["shards"]
    TeacherCache(folder).open_views(range(3))  # every file at its recorded size and sha256
    result = in_process([*settings, "--epochs", "2"], cache_teacher)
    assert "finished cache of these settings with 3 views: nothing to do" in result.stdout


# -- refusals ----------------------------------------------------------------------------------
def refusal(arguments, entry=main):
    result = in_process(arguments, entry)
    assert result.returncode != 0
    return result.stderr


def test_run_refusals_name_the_manifest_field_or_the_file(built_caches, demo_dir,
                                                         teacher_checkpoint, tmp_path):
    cache = built_caches["torch"]
    settings = [*run_settings(demo_dir, teacher_checkpoint, "torch"), "--output", str(tmp_path)]
    cases = [
        (["--teacher-cache", cache, "--seed", "4"],
         "was built for another run (augmentation.seed: cache 3, this run 4)"),
        (["--teacher-cache", cache, "--hflip", "0.5"],
         "augmentation.hflip: cache 0.0, this run 0.5"),
        (["--teacher-cache", cache, "--epochs", "3"],
         "holds 2 views (manifest field 'views'), one per epoch, and this run needs 3: extend "
         f"it (train/cache_teacher.py --teacher-cache {cache} --epochs 3, with this run's "
         "flags), or reuse them with --augment-views 2"),
        (["--teacher-cache", cache, "--distiller", "hcd"],
         "holds no teacher embedding (manifest field 'embedding')"),
        (["--teacher-cache", str(tmp_path / "none")], "does not exist: build it with"),
        (["--teacher-cache", cache, "--distiller", "ce"],
         "--teacher-cache holds a teacher's outputs: --distiller ce trains without a teacher"),
        (["--teacher-cache", demo_dir], "is not a teacher cache (no build.json)"),
        (["--teacher-cache", cache, "--distiller", "ldrld", "--mixup", "0.2"],
         "--mixup mixes samples across a batch, which the cache cannot replay"),
    ]
    if cpu_has_bf16():  # else --amp trains fp32 on this CPU, as the cache was built
        cases.append((["--teacher-cache", cache, "--amp"],
                      'precision: cache "float32", this run "bfloat16"'))
    for extra, message in cases:
        stderr = refusal([*settings, *extra])
        assert message in stderr, (extra, stderr[-2000:])
        assert "Traceback" not in stderr
    assert not os.listdir(tmp_path)  # no run folder was made


def test_builder_refusals(demo_dir, teacher_checkpoint, tmp_path):
    settings = run_settings(demo_dir, teacher_checkpoint, "torch")
    untrained = str(tmp_path / "untrained.pth")
    torch.manual_seed(0)
    torch.save(timm.create_model(MODEL, num_classes=10).state_dict(), untrained)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cases = [
        (["--teacher-cache", str(tmp_path / "foreign")],
         "holds files that are not a teacher cache's (no build.json)"),
        ([], "give --teacher-cache DIR (build) or --verify DIR (check), one of them"),
        (["--teacher-cache", str(tmp_path / "c"), "--lr", "0.1"],
         "--lr would change nothing in a teacher cache"),
        (["--teacher-cache", str(tmp_path / "c"), "--distiller", "ce"],
         "--distiller ce trains without a teacher: there is nothing to cache"),
        (["--verify", str(tmp_path / "foreign")], "is not a teacher cache (no build.json)"),
        # Checked as a live run checks it, before any shard: a run from the cache cannot.
        (["--teacher-cache", str(tmp_path / "u"), "--teacher-checkpoint", untrained],
         "no better than chance (10.00%)"),
    ]
    for extra, message in cases:
        stderr = refusal([*settings, *extra], cache_teacher)
        assert message in stderr, (extra, stderr[-2000:])
    assert os.listdir(tmp_path / "foreign") == ["notes.txt"]
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "u").exists()


def test_the_builders_help_lists_what_it_takes():
    """Not the trainer's flags that it refuses ("would change nothing in a teacher cache")."""
    text = build_cache_parser().format_help()
    for taken in ("--teacher-checkpoint", "--data-dir", "--scale", "--amp", "--epochs",
                  "--augment-views", "--cache-dtype", "--verify"):
        assert taken in text, taken
    for refused in ("--lr", "--opt ", "--output", "--resume", "--model-ema", "--ldrld-alpha"):
        assert refused not in text, refused


def test_a_build_resumed_with_other_settings_is_refused_field_by_field(built_caches, demo_dir,
                                                                       teacher_checkpoint,
                                                                       tmp_path):
    folder = str(tmp_path / "cache")
    shutil.copytree(built_caches["torch"], folder)
    os.remove(os.path.join(folder, "manifest.json"))
    stderr = refusal([*run_settings(demo_dir, teacher_checkpoint, "torch"), "--teacher-cache",
                      folder, "--cache-dtype", "float16"], cache_teacher)
    assert 'holds a cache built with other settings (dtype: cache "float32", this run ' \
           '"float16")' in stderr


def test_verify_recomputes_entries_with_the_live_teacher(built_caches, demo_dir,
                                                         teacher_checkpoint, tmp_path):
    result = in_process([*run_settings(demo_dir, teacher_checkpoint, "torch"), "--verify",
                         built_caches["torch"]], cache_teacher)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"64 samples, teacher logits: largest difference (\S+) \((\S+) of the "
                      r"largest value\), cache float32", result.stdout)
    assert found, result.stdout[-2000:]
    assert float(found[2]) < 1e-5
    assert "cache float32: within the rounding of float32" in result.stdout
    if cpu_has_bf16():  # the teacher computed in another precision: refused, as a run is
        result = in_process([*run_settings(demo_dir, teacher_checkpoint, "torch"), "--amp",
                             "--verify", built_caches["torch"]], cache_teacher)
        assert result.returncode == 1
        assert 'precision: cache "float32", this run "bfloat16"' in result.stderr
    # A cache whose values are not the teacher's (its manifest vouching for the files): exit 1.
    folder = tmp_path / "scaled"
    shutil.copytree(built_caches["torch"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        entry = shard["files"]["logits"]
        path = folder / entry["file"]
        np.save(path, np.load(path) * 1.01)
        entry.update(bytes=os.path.getsize(path), sha256=sha256_of(path))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = in_process([*run_settings(demo_dir, teacher_checkpoint, "torch"), "--verify",
                         str(folder)], cache_teacher)
    assert result.returncode == 1
    assert "cache float32: BEYOND the rounding of float32" in result.stdout
    assert "the teacher's logits differ from the cache's beyond rounding" in result.stderr
