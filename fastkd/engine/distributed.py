"""This process's place in a torchrun job, the few collectives the trainer needs, and a clean
shutdown of the process group."""

import gc
import logging
import os
import sys

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds ``group.WORLD`` as the default argument of ten functions
# when it is first imported, and DDP imports it lazily (through FSDP). Imported after the default
# group exists, it pins that group for the life of the interpreter: destroy_process_group cannot
# free it, and gloo's worker threads live on into interpreter shutdown (see ``World.close``).
# Imported here, before any group can exist, its defaults hold None.
import torch.distributed.nn  # noqa: F401

from .stop import StopVote


def init_process_group(backend, rank, world_size):
    """``dist.init_process_group`` that survives torchrun's restarts.

    torchrun's agent shares its rendezvous store with the workers (unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) and keeps that store across restarts, but the workers'
    keys carry no attempt number: restarted workers read the killed workers' addresses and fail
    with "Connection refused" in connectFullMesh. Each attempt's keys go under its own prefix.
    The agent counts its restarts, which is one count for the whole job on one node; across
    nodes an agent restarts its workers without counting when another node failed, so there the
    prefix would not match and such a job is refused with its command line
    (``config.check_launch``, in both entry points' parsers).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size, is_master=False)
    attempt = f"fastkd/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    dist.init_process_group(backend, store=dist.PrefixStore(attempt, store), rank=rank,
                            world_size=world_size)


logger = logging.getLogger("fastkd.train")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes (a test's capture replaces it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(main):
    """The trainer's log: timestamped lines on stdout from rank 0; other ranks log only
    warnings and errors."""
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if main else logging.WARNING)


class World:
    """Rank, world size and device from torchrun's environment; one process per device (NCCL on
    CUDA, gloo on CPU). Under torchrun the job is a process group even with one process, so that
    one GPU runs the code that several run (DDP, collectives); without torchrun it is a world of
    one and every collective is local. ``stop``: the job's ``StopVote`` (stop signals)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.distributed = self.world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        configure_logging(self.main)
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            init_process_group("nccl" if cuda else "gloo", self.rank, self.world_size)
        self.stop = StopVote(self)  # install() takes the signals

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def _reduce(self, values, op):
        """One collective and one host read for the whole list, whose items may be numbers or
        one-element tensors on any device (made on the device, they are not read one by one)."""
        tensor = torch.stack([torch.as_tensor(value, device=self.device).to(torch.float64)
                              .reshape(()) for value in values])
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values):
        """Element-wise sum over ranks of a list of numbers or one-element tensors."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def min(self, values):
        """Element-wise minimum over ranks of a list of numbers or one-element tensors."""
        return self._reduce(values, dist.ReduceOp.MIN)

    def max(self, values):
        """Element-wise maximum over ranks of a list of numbers or one-element tensors."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        box = [value]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value):
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def log(self, message):
        """``message`` through the ``fastkd.train`` logger, which only rank 0 writes."""
        logger.info(message)

    def close(self):
        """Destroy the process group while the interpreter is still whole.

        A gloo worker thread drops its reference to a finished collective after the caller already
        has the result. When the collective's tensor has a Python object, dropping it takes the
        GIL; if the main thread has meanwhile begun interpreter shutdown, Python ends the worker
        thread inside that C++ destructor and the process dies with "terminate called without an
        active exception" (SIGABRT) after a successful run (pytorch/pytorch#190489). The group's
        destructor joins its worker threads with the GIL released, so once nothing holds the
        group (DDP modules keep it: the caller must have dropped them; ``gc.collect`` frees those
        still in reference cycles), no worker outlives this call.
        """
        self.stop.close()
        if self.distributed and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
            gc.collect()
