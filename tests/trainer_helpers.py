"""Running the real trainer in tests: ``train/main.py`` in this interpreter, as a plain process
or under torchrun."""

import contextlib
import io
import os
import subprocess
import sys
import time

from fastkd.engine.cli import main

MAIN = os.path.join(os.path.dirname(__file__), os.pardir, "train", "main.py")
CACHE_TEACHER = os.path.join(os.path.dirname(__file__), os.pardir, "train", "cache_teacher.py")
# One short epoch on the demo digits, in the test process's own threads (at most 2 processes of
# 64: the 240-image tree holds one global batch of 128).
FAST = ["--epochs", "1", "--batch-size", "64", "--workers", "0", "--loader", "torch",
        "--model", "resnet20"]
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
        try:
            entry(list(args))
            status = 0
        except SystemExit as stop:
            status = stop.code
            if status is None:
                status = 0
            elif not isinstance(status, int):
                print(status, file=sys.stderr)
                status = 1
    return subprocess.CompletedProcess([MAIN, *args], status, stdout.getvalue(),
                                       stderr.getvalue())


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
    """Poll ``ready()`` until it is true; fail if ``process`` exits first or time runs out."""
    deadline = time.time() + seconds
    while not ready():
        assert process.poll() is None, f"exited ({process.returncode}) before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.2)


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


# Runs fastkd's trainer, then names the gloo threads and counts the child processes this process
# still has: what is alive when the interpreter shuts down.
EXIT_PROBE = """
import multiprocessing, os, sys
from fastkd.engine.cli import main
try:
    main()
except SystemExit as stop:
    status = stop.code
names = []
for task in os.listdir("/proc/self/task"):
    try:
        with open(f"/proc/self/task/{task}/comm") as handle:
            names.append(handle.read().strip())
    except (FileNotFoundError, ProcessLookupError):  # a thread that ended after the listing
        pass  # (a queue's feeder): gone before its open, or between the open and the read
# One write per line (print writes its pieces apart, unbuffered under PYTHONUNBUFFERED): the
# ranks of a job share the pipe, and their pieces interleave.
gloo = sorted(name for name in names if "gloo" in name)
sys.stdout.write(f"threads left: {gloo}\\n")
sys.stdout.write(f"processes left: {len(multiprocessing.active_children())}\\n")
sys.stdout.flush()
sys.exit(status)
"""



def exit_probe(folder):
    """A script, written in ``folder``, that runs ``train/main.py``'s job and then prints what
    is still alive in its process: for ``run_main(..., script=exit_probe(folder))``."""
    path = os.path.join(folder, "exit_probe.py")
    with open(path, "w") as handle:
        handle.write(EXIT_PROBE)
    return path


def assert_nothing_outlives_the_run(result, processes):
    """What is still alive at interpreter shutdown misbehaves there: after main() no gloo thread
    and no loader worker may be, in any of the ``processes``.
    - The abort at exit (`terminate called without an active exception`, SIGABRT, in about one
      run in five): a gloo worker thread released a collective's tensor while the interpreter
      was shutting down, because the process group could never be freed.
    - A late exit (22 s with 2 loader workers, 31 s with 4): persistent DataLoader workers,
      stopped only when a reference cycle was collected at shutdown, each joined after a 5 s
      time-out."""
    assert "terminate called" not in result.stderr
    assert result.stdout.count("threads left: []") == processes, result.stdout[-2000:]
    assert result.stdout.count("processes left: 0") == processes, result.stdout[-2000:]
