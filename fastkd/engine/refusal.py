"""Settings a job refuses, said once: under torchrun every process reads the same command line
and refuses it alike, and N copies of one message bury it."""

import os
import time

# How long another process of a refused job waits for the first to report and exit, which ends
# the job (torchrun then stops the others), before it reports and exits itself.
REPORT_WAIT_S = 10


class Refused(SystemExit):
    """``SystemExit("error: ...")`` for settings that every process of the job refuses alike (a
    flag's value, a model or checkpoint that does not fit them): each node's first process
    says so (``exit_status``)."""


def exit_status(refusal, local_rank):
    """The exit status for ``refusal`` in the node's process ``local_rank``: the message in the
    first; in the others, the message only if torchrun has not stopped them ``REPORT_WAIT_S`` later
    (had they exited first, torchrun could stop the first before it printed; and a refusal
    that only this process met still gets said)."""
    if local_rank != 0:
        time.sleep(REPORT_WAIT_S)
        refusal.code = f"{refusal.code} (process {local_rank} of the node, pid {os.getpid()})"
    return refusal.code
