"""Stopping a training job on a signal: every rank at the same step boundary, saved.

A cluster signals every process of a job, or only some: the launcher alone (Ctrl-C on torchrun,
which forwards the signal), one rank, all at once (SLURM's cgroup), and SIGKILLs what is left
after a grace period of 30-90 s. So a signal is only recorded where it lands; the ranks then agree
on it at a step boundary and all stop there, before the next step, and save.

The agreement is a vote on a CPU (gloo) process group of its own, posted without waiting after
each step and read at the next boundary, one step later, when it has long arrived: a rank that
received a signal during step n votes at boundary n, and every rank stops at boundary n + 1. No
device work is waited for, so the training loop keeps its one host read per log point.

Outside training (loading, evaluating a teacher, between the demo's runs) there is nothing to
save: a signal stops the job at once (``Stopped`` raised by the handler).

Under torchrun each worker is its parent's (the launcher's) child in a session of its own. If the
launcher dies without forwarding a signal (``kill -9``, the OOM killer), the kernel sends the
worker SIGTERM (``PR_SET_PDEATHSIG``), which then stops like any other.
"""

import ctypes
import os
import signal

import numpy as np
import torch
import torch.distributed as dist

from ..signals import STOP_SIGNALS

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stopped(Exception):
    """A stop signal: ``number``; ``step``: the steps of the epoch done when the ranks agreed
    (None outside an epoch)."""

    def __init__(self, number, step=None):
        super().__init__(number, step)
        self.number, self.step = number, step

    @property
    def name(self):
        return signal.Signals(self.number).name


class StopVote:
    """This process's stop signals and the ranks' agreement on them.

    ``install()`` takes SIGTERM, SIGINT and SIGUSR1 for the life of the job (``uninstall()``
    gives them back). While ``deferred``
    (a run's training and evaluation) a signal is only recorded, for ``poll``; otherwise the
    handler raises ``Stopped`` at once.
    """

    def __init__(self, world):
        self.world = world
        self.received = 0  # the first stop signal this process got; 0: none
        self.deferred = False
        self.pending = None  # the vote posted at the last poll, still to be read
        self.previous = {}
        self.ballot = np.zeros(1, dtype=np.int64)  # read without a torch op (no host-read count)
        self.group = dist.new_group(backend="gloo") if world.distributed else None

    def install(self):
        self.previous = {number: signal.signal(number, self._on_signal)
                         for number in STOP_SIGNALS}
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: its parent is the launcher
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() == 1:  # the launcher died before the request took effect
                self._on_signal(signal.SIGTERM, None)

    def uninstall(self):
        """The handlers ``install`` replaced, back (for ``main()`` called in a process that goes
        on, as tests do)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def close(self):
        """Let go of the vote's process group (its gloo threads end with it; see
        ``World.close``)."""
        if self.pending is not None:
            self.pending.wait()
        self.group = self.pending = None

    def _on_signal(self, number, frame):
        self.received = self.received or number
        if not self.deferred:
            raise Stopped(number)

    def poll(self):
        """At a boundary that every rank reaches in the same order (the same number of polls on
        every rank): the signal the ranks agreed to stop on, or 0 to go on. Agreement comes one
        poll after the first rank's signal, and on every rank at the same poll."""
        if self.group is None:
            return self.received
        agreed = self._read()
        if not agreed:
            self.ballot[0] = self.received
            self.pending = dist.all_reduce(torch.from_numpy(self.ballot), op=dist.ReduceOp.MAX,
                                           group=self.group, async_op=True)
        return agreed

    def settle(self):
        """The signal the ranks agree on now, waiting for the vote: where no later boundary
        comes (the end of a run). Leaves no vote pending."""
        agreed = self.poll()
        return agreed or self._read()

    def _read(self):
        """The pending vote's result (0 when none is pending), waited for."""
        if self.pending is None:
            return 0
        self.pending.wait()
        self.pending = None
        return int(self.ballot[0])
