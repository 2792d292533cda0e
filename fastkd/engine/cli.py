"""``fastkd-train`` and ``train/main.py``: the command line is parsed and checked before the
training job, and with it torch, is imported, so that a refused command line answers at once."""

import contextlib
import gc
import io
import os
import time

from .refusal import REPORT_WAIT_S


def main(argv=None):
    """``train/main.py`` and ``fastkd-train``: ``argv``, or this process's command line (then
    the process is the job's: ``start_up``)."""
    with start_up(argv is None):
        from .config import parse_args

        args = parse_once_per_job(parse_args, argv)
        from .trainer import run_job_and_exit
    run_job_and_exit(args)


def cache_teacher(argv=None):
    """``fastkd-cache-teacher`` and ``train/cache_teacher.py``; ``argv`` as for ``main``."""
    with start_up(argv is None):
        from .config import parse_cache_args

        args = parse_once_per_job(parse_cache_args, argv)
        from .cache_teacher import run_and_exit
    run_and_exit(args)


@contextlib.contextmanager
def start_up(own_process):
    """The imports of a process that runs one job (``own_process``), with the garbage collector
    off, then what they made frozen out of its reach (``gc.freeze``): torch's, timm's and
    DALI's ~400,000 objects live as long as the process. Python would otherwise scan them all in
    each full collection: 7 during the imports and a few in a run, ~0.2 s each on one core (a
    pause inside a training step), two more in ``World.close``. Forked loader workers then do
    not touch their pages either (copy-on-write). The price: the imports' own garbage in
    reference cycles (~8 MB beside torch's ~700) is frozen with them, where one collection
    before the freeze would cost 0.3 s. A caller that passes ``argv`` shares its process: its
    collector is left as it is."""
    if not own_process:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def parse_once_per_job(parse, argv):
    """``parse(argv)``, in which a refused command line (and ``--help``, ``--version``) is
    printed by each node's first process alone (each node has its own log): under torchrun
    every process reads the same command line and would print alike, and N copies of one
    message bury it. On a refusal the others stay silent and wait (``REPORT_WAIT_S``): had one
    exited first, torchrun could stop the first before it printed anything."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        return parse(argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return parse(argv)
    except SystemExit as stop:
        if stop.code in (None, 0):  # --help, --version: the first process printed them
            raise
        time.sleep(REPORT_WAIT_S)
        raise SystemExit(stop.code if isinstance(stop.code, int) else 1) from None


if __name__ == "__main__":  # python -m fastkd.engine.cli, as train/main.py
    main()
