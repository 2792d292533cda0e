"""Jobs of the trainer (``train/main.py``) or the cache builder (``train/cache_teacher.py``), one
after another in each process of one launch: ``python run_jobs.py BATCH.json``, under torchrun
for several processes. A launch costs each process its imports (torch, timm: ~4 s of CPU on 2
cores); one launch pays them once for all its jobs.

BATCH.json is ``{"folder": F, "jobs": [{"name": N, "entry": "main" | "cache_teacher", "argv":
[...]}, ...]}``. Each job's file descriptors 1 and 2 (so its loader workers' lines too) go to
F/N.rankR.out and F/N.rankR.err; F/N.rankR.json records its exit status, as the interpreter
would give it, and what was still alive in the process after it: gloo threads and child
processes (the test ``assert_nothing_outlives_the_run``)."""

import contextlib
import json
import multiprocessing
import os
import sys
import traceback
from unittest import mock

from trainer_helpers import exit_status

from fastkd.engine import cli


@contextlib.contextmanager
def output_to(base):
    """File descriptors 1 and 2 to ``base``.out and ``base``.err, then back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(f"{base}.out", "w") as out, open(f"{base}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for descriptor, copy in zip((1, 2), saved):
                os.dup2(copy, descriptor)
                os.close(copy)


def as_attempt(number):
    """Under torchrun, each job as another attempt of the job: a process group made after an
    earlier one was destroyed reuses its key names in torchrun's store, and would read the
    earlier group's addresses (gloo then connects to closed ports); the trainer keeps each
    attempt's keys apart (``distributed.init_process_group``), as after torchrun's restarts."""
    return mock.patch.dict(os.environ, {"TORCHELASTIC_RESTART_COUNT": str(number)})


def job_status(entry, argv):
    """``entry(argv)``'s exit status (``trainer_helpers.exit_status``); an exception's traceback
    is printed and gives 1, as in a process, and the next job still runs."""
    try:
        return exit_status(entry, argv)
    except Exception:  # noqa: BLE001 - reported in the job's own file, as a process would
        traceback.print_exc()
        return 1


def gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                names.append(handle.read().strip())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended after the listing
            pass
    return sorted(name for name in names if "gloo" in name)


def main(path):
    with open(path) as handle:
        batch = json.load(handle)
    # What each job's own process would do (``cli.start_up``), once for all the jobs.
    with cli.start_up(own_process=True):
        import fastkd.engine.cache_teacher  # noqa: F401
        import fastkd.engine.trainer  # noqa: F401
    rank = os.environ.get("RANK", "0")
    for number, job in enumerate(batch["jobs"]):
        base = os.path.join(batch["folder"], f"{job['name']}.rank{rank}")
        with output_to(base), as_attempt(number):
            status = job_status(getattr(cli, job.get("entry", "main")), job["argv"])
        record = {"status": status, "gloo_threads": gloo_threads(),
                  "processes": len(multiprocessing.active_children())}
        with open(f"{base}.json", "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    main(sys.argv[1])
