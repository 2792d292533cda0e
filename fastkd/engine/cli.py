"""``fastkd-train`` and ``train/main.py``: the command line is parsed and checked before the
training job, and with it torch, is imported, so that a refused command line answers at once."""


def main(argv=None):
    from .config import parse_args

    args = parse_args(argv)
    from .trainer import run_job_and_exit

    run_job_and_exit(args)


def cache_teacher(argv=None):
    """``fastkd-cache-teacher`` and ``train/cache_teacher.py``."""
    from .config import parse_cache_args

    args = parse_cache_args(argv)
    from .cache_teacher import run_and_exit

    run_and_exit(args)
