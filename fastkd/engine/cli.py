"""``fastkd-train`` and ``train/main.py``: the command line is parsed and checked before the
training job, and with it torch, is imported, so that a refused command line answers at once."""


def main(argv=None):
    from .config import parse_args

    args = parse_args(argv)
    from .trainer import run_job_and_exit

    run_job_and_exit(args)
