"""The signals that stop a training job, and keeping them from its helper processes.

A cluster stops a job by signalling every process of it: SLURM its whole cgroup (SIGTERM, or
SIGUSR1 with ``--signal``), torchrun each worker's process group, a terminal its foreground group
(Ctrl-C: SIGINT). Loader workers (DataLoader processes, DALI's) share those groups. If they die
of it, the training process fails on its next batch before it can save; so they never see these
signals and the training process alone decides (see ``fastkd.engine.stop``).
"""

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def blocked_for_children():
    """Start helper processes inside this block: they inherit the stop signals blocked (a blocked
    signal mask survives fork and exec), so a signal to their process group leaves them alone
    (``obey_parent_only`` then lets their parent's own SIGTERM through). In this process a signal
    that arrives within the block is held and delivered when it ends, not lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def obey_parent_only(_worker_id=None):
    """In a helper process started within ``blocked_for_children`` (a DataLoader
    ``worker_init_fn``): a thread takes the stop signals, ends the process on one its parent sent
    (multiprocessing's ``terminate``, when the parent closes it) and drops those from anyone else
    (a signal to the whole process group, a cluster's signal to every process)."""
    parent = os.getppid()

    def watch():
        while True:
            received = signal.sigwaitinfo(STOP_SIGNALS)
            if received.si_pid == parent:
                os._exit(128 + received.si_signo)

    threading.Thread(target=watch, name="fastkd-stop-signals", daemon=True).start()
