"""Running the real trainer in tests: ``train/main.py`` in this interpreter, as a plain process
or under torchrun."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

from fastkd.data.demo import MANIFEST
from fastkd.engine.cli import main

MAIN = os.path.join(os.path.dirname(__file__), os.pardir, "train", "main.py")
# The net the trainer tests train (student, and the teacher conftest trains): the smallest CIFAR
# ResNet, one basic block a stage, whose training step takes a third of resnet20's on CPU.
MODEL = "resnet8"
# One short epoch on the demo digits, in the test process's own threads (at most 2 processes of
# 64: the 240-image tree holds one global batch of 128).
FAST = ["--epochs", "1", "--batch-size", "64", "--workers", "0", "--loader", "torch",
        "--model", MODEL]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", *options]


def command(args, processes=1, script=MAIN):
    """``python script args``, or under ``torchrun --standalone`` for several processes."""
    if processes == 1:
        return [sys.executable, script, *args]
    return torchrun("--standalone", f"--nproc-per-node={processes}", script, *args)


def run_main(args, processes=1, timeout=300, script=MAIN, env=ENV):
    """``train/main.py args`` to its end: ``(returncode, stdout, stderr)`` as a
    ``CompletedProcess``. Under torchrun (``processes`` > 1), or with another script or
    environment, in processes of its own; else in this interpreter (``in_process``)."""
    if processes == 1 and script == MAIN and env is ENV:
        return in_process(args)
    return subprocess.run(command(args, processes, script), capture_output=True, text=True,
                          timeout=timeout, env=env)


def in_process(args, entry=main):
    """``train/main.py args`` as ``fastkd.engine.cli.main`` (or another ``entry``, e.g.
    ``cli.cache_teacher``) in this interpreter, which has torch
    and timm imported already (a new one takes ~4 s for that on 2 cores): its stdout and stderr
    captured and its exit status as the interpreter would give it (a message: printed, then 1).
    The job's state is its own (seeds, signal handlers, run folder), set and undone by the job."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = exit_status(entry, args)
    return subprocess.CompletedProcess([MAIN, *args], status, stdout.getvalue(),
                                       stderr.getvalue())


def exit_status(entry, args):
    """``entry(args)``'s exit status as the interpreter would give it: a message is printed on
    stderr and gives 1."""
    try:
        entry(list(args))
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


def start(argv, log=None):
    """A background process in a session (and process group) of its own, as a shell starts a
    job, so that a signal to its group reaches it and its children, not the tests; its stdout
    and stderr go to the file ``log`` if given, else to pipes."""
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV, start_new_session=True)
    with open(log, "w") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def wait_until(ready, process, what, seconds=240):
    """Poll ``ready()`` every 50 ms (a demo-tree step takes about as long) until it is true; fail
    if ``process`` exits first or time runs out."""
    deadline = time.time() + seconds
    while not ready():
        assert process.poll() is None, f"exited ({process.returncode}) before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.05)


def wait_for(path, process, seconds=240):
    wait_until(lambda: os.path.exists(path), process, f"{path} appeared", seconds)


def children(pid):
    """Process ids of ``pid``'s children (Linux /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def environment_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as handle:
        entries = handle.read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


RUN_JOBS = os.path.join(os.path.dirname(__file__), "run_jobs.py")


def run_jobs(folder, jobs, processes):
    """``jobs`` (``{name: argv}``, or ``{name: (entry, argv)}`` for ``cli.cache_teacher``) one
    after another in each process of one launch of ``run_jobs.py`` (torchrun for several
    processes): one launch's imports for all of them. Their outputs and records go to
    ``folder``; read each with ``job_result``."""
    os.makedirs(folder, exist_ok=True)
    batch = {"folder": str(folder), "jobs": [
        {"name": name, "entry": job[0], "argv": job[1]} if isinstance(job, tuple) else
        {"name": name, "argv": job} for name, job in jobs.items()]}
    path = os.path.join(folder, "batch.json")
    with open(path, "w") as handle:
        json.dump(batch, handle)
    launch = subprocess.run(command([path], processes, script=RUN_JOBS), capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert launch.returncode == 0, launch.stderr[-3000:]


def job_result(folder, name, processes):
    """A job of ``run_jobs``: its ranks' stdout and stderr (rank order) and the first non-zero
    exit status as a ``CompletedProcess``, with ``alive``: each rank's record of what was still
    alive in its process after the job."""
    def read(rank, suffix):
        with open(os.path.join(folder, f"{name}.rank{rank}.{suffix}")) as handle:
            return handle.read()

    records = [json.loads(read(rank, "json")) for rank in range(processes)]
    status = next((record["status"] for record in records if record["status"]), 0)
    result = subprocess.CompletedProcess(
        [RUN_JOBS, name], status, "".join(read(rank, "out") for rank in range(processes)),
        "".join(read(rank, "err") for rank in range(processes)))
    result.alive = [(record["gloo_threads"], record["processes"]) for record in records]
    return result


def assert_nothing_outlives_the_run(result):
    """What is still alive at interpreter shutdown misbehaves there: after main() no gloo thread
    and no loader worker may be, in any of the job's processes (``job_result``).
    - The abort at exit (`terminate called without an active exception`, SIGABRT, in about one
      run in five): a gloo worker thread released a collective's tensor while the interpreter
      was shutting down, because the process group could never be freed.
    - A late exit (22 s with 2 loader workers, 31 s with 4): persistent DataLoader workers,
      stopped only when a reference cycle was collected at shutdown, each joined after a 5 s
      time-out."""
    assert "terminate called" not in result.stderr
    assert result.alive == [([], 0)] * len(result.alive), result.alive


def small_demo_tree(full_demo_dir, root, counts):
    """The first ``counts[split]`` images of each class and split of the demo tree at
    ``full_demo_dir``, copied to ``root`` with a manifest that lists just those: the trainer's
    ``--dataset demo --data-dir root`` takes the tree as complete rather than rebuilding it."""
    kept = []
    for split, count in counts.items():
        for label in sorted(os.listdir(os.path.join(full_demo_dir, split))):
            names = sorted(os.listdir(os.path.join(full_demo_dir, split, label)))[:count]
            os.makedirs(os.path.join(root, split, label))
            for name in names:
                relative = f"{split}/{label}/{name}"
                shutil.copyfile(os.path.join(full_demo_dir, relative),
                                os.path.join(root, relative))
                kept.append(relative)
    with open(os.path.join(root, MANIFEST), "w") as handle:
        json.dump({"files": kept}, handle)
    return root
