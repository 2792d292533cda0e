"""The trainer under faults, with real processes: clean exits, interrupted runs and teachers,
reused run names, signals, files that survive a crash and two nodes. (torchrun's restart of a
killed worker: test_preemption.)"""

import csv
import json
import os
import signal
import socket

import pytest
import torch
import yaml
from test_data import needs_dali
from trainer_helpers import (
    FAST,
    MAIN,
    MODEL,
    assert_nothing_outlives_the_run,
    command,
    run_main,
    small_demo_tree,
    start,
    torchrun,
    wait_until,
)

from fastkd.data.loaders import dali_available
from fastkd.files import atomic_write


def summary_top1(folder):
    with open(os.path.join(folder, "summary.csv"), newline="") as handle:
        return float(list(csv.DictReader(handle))[-1]["eval_top1"])


def summary_epochs(folder):
    with open(os.path.join(folder, "summary.csv"), newline="") as handle:
        return [row["epoch"] for row in csv.DictReader(handle)]


def non_finite_loss_job(demo_dir, output):
    return ["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce", "--output", output,
            *FAST, "--workers", "2", "--lr", "1e30", "--warmup-epochs", "0", "--batch-size", "16"]


def bad_images_job(root, output, loader):
    return ["--dataset", "folder", "--data-dir", root, "--distiller", "ce", "--model",
            MODEL, "--img-size", "32", "--epochs", "2", "--batch-size", "7", "--workers",
            "1", "--loader", loader, "--output", output, "--experiment", "run"]


def two_process_jobs(inputs):
    """A run stopped by a non-finite loss, and runs over bad images (conftest's one launch)."""
    jobs = {"non-finite-loss": non_finite_loss_job(inputs.demo_dir,
                                                   inputs.output("non-finite-loss"))}
    for loader in ("torch", "dali") if dali_available() else ("torch",):
        jobs[f"bad-images-{loader}"] = bad_images_job(inputs.bad_tree[0],
                                                      inputs.output(f"bad-images-{loader}"),
                                                      loader)
    return jobs


# A clean two-process finish is checked by test_trainer's run of each distiller.
def test_no_gloo_thread_or_loader_worker_outlives_a_stopped_run(two_process_jobs):
    """After main() nothing may be alive (``assert_nothing_outlives_the_run``) on a stop under
    torchrun: the process group's closing collects the cycle that held the loader workers. (A
    plain process's finish: test_preemption.)"""
    stopped, _ = two_process_jobs("non-finite-loss")
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert_nothing_outlives_the_run(stopped)


@pytest.fixture(scope="module")
def tiny_demo_dir(full_demo_dir, tmp_path_factory):
    """12 training and 8 validation images a class: the demo teacher's 8 epochs (7 steps each at
    batch 16) on half demo_dir's images. It still reaches 75% top-1, far above the trainer's bar
    for a teacher (20%)."""
    return small_demo_tree(full_demo_dir, str(tmp_path_factory.mktemp("tiny-digits")),
                           {"train": 12, "val": 8})


def test_interrupted_demo_teacher_is_resumed_not_reused(tiny_demo_dir, tmp_path):
    args = ["--dataset", "demo", "--data-dir", tiny_demo_dir, "--distiller", "kd", "--teacher",
            "resnet20", "--output", str(tmp_path), "--experiment", "student", *FAST,
            "--batch-size", "16"]
    teacher = tmp_path / "demo-teacher-resnet20-10cls-32px-8ep-scale0.5-1-flip0"
    log = tmp_path / "stopped.txt"
    process = start(command(args + ["--log-interval", "1"]), log=log)
    # The teacher reads the student's loaders: 7 steps of 16 an epoch.
    wait_until(lambda: "epoch 1 [3/" in log.read_text(), process, "the teacher's epoch 1")
    os.killpg(process.pid, signal.SIGTERM)  # a signal while the demo teacher trains
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    stopped = torch.load(teacher / "last.pth", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["step"] >= 3  # saved where it stopped
    assert not (teacher / "complete.json").exists()

    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the cached demo teacher" not in result.stdout
    assert (f"resumed {teacher}/last.pth at epoch {stopped['epoch']}" +
            f", step {stopped['step']}/7") in result.stdout
    # The record of what the teacher was trained with: every option but the seed (one teacher
    # serves every seed) and how the job ran.
    record = json.loads((teacher / "complete.json").read_text())
    expected = {"dataset": "demo", "model": "resnet20", "distiller": "ce", "epochs": 8,
                "img_size": 32, "num_classes": 10, "scale": [0.5, 1.0], "ratio": [0.75, 4 / 3],
                "hflip": 0.0, "batch_size": 16, "lr": 0.02, "warmup_epochs": 1}
    assert {key: record.get(key) for key in expected} == expected
    assert not {"seed", "output", "experiment", "resume", "workers"} & set(record)
    assert summary_epochs(teacher) == [str(epoch) for epoch in range(8)]
    # The demo's CE baseline: the student's model, seed and epochs, no teacher; the closing
    # table gives the distilled student's gain over it.
    baseline = tmp_path / "student-ce-baseline"
    settings = yaml.safe_load((baseline / "args.yaml").read_text())
    student = yaml.safe_load((tmp_path / "student" / "args.yaml").read_text())
    assert settings["distiller"] == "ce" and student["distiller"] == "kd"
    assert all(settings[key] == student[key] for key in ("model", "seed", "epochs", "lr"))
    gain = (summary_top1(tmp_path / "student") - summary_top1(baseline))
    assert f"baseline  {MODEL} (ce)" in result.stdout
    assert f"kd - ce top-1: {gain:+.2f} last, {gain:+.2f} best" in result.stdout

    # Resumed from its checkpoint for one more epoch: the cached teacher, and the baseline that
    # the first run recorded, resumed for the same epoch, so the closing table keeps its row.
    again = run_main(args + ["--resume", str(tmp_path / "student" / "last.pth"), "--epochs", "2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"using the cached demo teacher {teacher}/best.pth" in again.stdout
    assert f"resumed {baseline}/last.pth at epoch 1" in again.stdout
    assert summary_epochs(baseline) == summary_epochs(tmp_path / "student") == ["0", "1"]
    gain = (summary_top1(tmp_path / "student") - summary_top1(baseline))
    assert f"baseline  {MODEL} (ce)" in again.stdout
    assert f"kd - ce top-1: {gain:+.2f} last" in again.stdout

    # A teacher finished with another recipe (as if the dataset's defaults had changed since)
    # is neither reused nor trained over: refused before any work, naming what differs.
    (teacher / "complete.json").write_text(json.dumps({**record, "lr": 0.5}))
    before = sorted(os.listdir(tmp_path))
    refused = run_main(args + ["--experiment", "other"])
    assert refused.returncode == 1
    assert (f"error: {teacher} holds the demo teacher trained with other settings (--lr 0.5 -> "
            "0.02): remove that folder") in refused.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_a_reused_run_name_never_touches_the_earlier_run(demo_dir, tmp_path):
    args = ["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce", "--output",
            str(tmp_path), "--experiment", "run", *FAST]
    assert run_main(args).returncode == 0
    first = tmp_path / "run"
    before = {name: (first / name).read_bytes() for name in os.listdir(first)}
    assert {"args.yaml", "summary.csv", "last.pth", "best.pth", "curves.png"} <= set(before)

    for suffix in ("-1", "-2"):
        result = run_main(args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"outputs in {tmp_path}/run{suffix}" in result.stdout
        assert summary_epochs(tmp_path / f"run{suffix}") == ["0"]
    assert {name: (first / name).read_bytes() for name in os.listdir(first)} == before


def test_an_unreadable_checkpoint_is_named(demo_dir, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    for option in ("--resume", "--teacher-checkpoint"):
        result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "kd",
                           "--teacher", "resnet20", "--output", str(tmp_path / "out"), *FAST,
                           option, str(junk)])
        assert result.returncode == 1
        assert f"error: cannot read the checkpoint {junk} given to {option}" in result.stderr
        assert ("(not a file that torch.save or safetensors wrote, or a damaged one)"
                in result.stderr)
        assert "Traceback" not in result.stderr
    # Files torch.save wrote, but not the trainer: a bare state dict, a list.
    for name, content in (("weights.pth", {"a": torch.zeros(2)}), ("list.pth", [1, 2])):
        torch.save(content, tmp_path / name)
        result = run_main(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce",
                           "--output", str(tmp_path / "out"), *FAST, "--resume",
                           str(tmp_path / name)])
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert (f"error: --resume {tmp_path / name} is not a fastkd checkpoint to resume (no "
                "'args' entry)") in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_folder_is_used_by_one_job_at_a_time(demo_dir, tmp_path):
    args = command(["--dataset", "demo", "--data-dir", demo_dir, "--distiller", "ce", "--output",
                    str(tmp_path), "--experiment", "run", "--resume", "auto", *FAST,
                    "--epochs", "5", "--batch-size", "16", "--log-interval", "1"])
    first = start(args, log=tmp_path / "first.txt")
    wait_until(lambda: "epoch 0 [" in (tmp_path / "first.txt").read_text(), first,
               "the first job's first step")
    second = run_main(args[2:])
    first.kill()
    first.wait()
    assert second.returncode == 1
    assert f"error: {tmp_path}/run is in use by another running job" in second.stderr


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=needs_dali)])
def test_bad_images_are_skipped_named_once_and_listed(tree_with_bad_images, two_process_jobs,
                                                      tmp_path, loader):
    root, bad = tree_with_bad_images
    result, output = two_process_jobs(f"bad-images-{loader}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    for path in bad:
        assert text.count(f"skipping bad image {path}: ") == 1, text[-3000:]
    with open(os.path.join(output, "run", "bad_images.txt")) as handle:
        assert [line.split("\t")[0] for line in handle] == bad
    with open(os.path.join(output, "run", "summary.csv"), newline="") as handle:
        assert [row["bad_images"] for row in csv.DictReader(handle)] == ["4", "4"]

    refused = run_main([*bad_images_job(root, str(tmp_path), loader), "--bad-images", "error",
                        "--experiment", "refused"])
    assert refused.returncode == 1
    assert "error: --bad-images error: 4 bad image file(s)" in refused.stderr
    for path in bad:  # named up front, all of them
        assert path in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_atomic_write_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    path.write_bytes(b"old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))),
                                                     real_replace(a, b)))
    with atomic_write(path, "wb") as handle:
        handle.write(b"new")
    temporary = f"{path}.{os.getpid()}.tmp"
    assert events == [("fsync", temporary), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"new"

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["last.pth"]  # no temporary file left behind


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(tmp_path, options, args):
    """Two torchrun invocations with one process each, as two nodes on this machine; their
    output goes to tmp_path/node<rank>.txt."""
    port = free_port()
    return [start(torchrun("--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
                           "--master-addr=127.0.0.1", f"--master-port={port}", *options, MAIN,
                           *args), log=tmp_path / f"node{rank}.txt")
            for rank in (0, 1)]


def test_two_nodes_on_localhost(demo_dir, tmp_path):
    nodes = start_nodes(tmp_path, [], ["--dataset", "demo", "--data-dir", demo_dir,
                                       "--distiller", "ce", "--output", str(tmp_path),
                                       "--experiment", "run", *FAST, "--batch-size", "32",
                                       "--log-interval", "1"])
    for node in nodes:
        assert node.wait(timeout=300) == 0, [(tmp_path / f"node{rank}.txt").read_text()[-2000:]
                                             for rank in (0, 1)]
    output = (tmp_path / "node0.txt").read_text()
    assert "epoch 0 [3/3]" in output  # 240 images in global batches of 2 x 32: 3 steps
    assert f"outputs in {tmp_path}/run" in output
    assert summary_epochs(tmp_path / "run") == ["0"]
    assert not (tmp_path / "run-1").exists()  # one run folder, chosen by rank 0


def test_restarts_across_nodes_on_a_shared_store_are_refused_with_the_fix(demo_dir, tmp_path):
    nodes = start_nodes(tmp_path, ["--max-restarts=1"], ["--dataset", "demo", "--data-dir",
                                                         demo_dir, "--distiller", "ce",
                                                         "--output", str(tmp_path), *FAST])
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) != 0
        assert ("error: torchrun --max-restarts across several nodes needs "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") in (tmp_path / f"node{rank}.txt").read_text()
    assert set(os.listdir(tmp_path)) == {"node0.txt", "node1.txt"}  # refused before any run
