"""Data-parallel training: this process's place among the run's processes.

A run on ``W`` processes is started by ``torch.distributed.run`` (``cockpit run --nproc W`` or
``torchrun``), which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's
environment. Every process builds the same model from the same seed and draws the same
sequence of global batches; process ``r`` trains on rows ``[r n, (r + 1) n)`` of each batch
(``n = N / W``), and :class:`~torch.nn.parallel.DistributedDataParallel` averages the
gradients, so the update is the single-process update on the whole batch. The instruments
combine their per-sample sums over a process group of their own (:mod:`instruments.sync`).
Only rank 0 evaluates, writes the run directory and shows the display.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cockpit_cli.config import RunConfig
from cockpit_cli.instruments.sync import GroupSynchronizer
from cockpit_cli.launch import StopSignals, environment_world, worker_signals
from cockpit_cli.training.build import resolve_device

# Long enough for rank 0's evaluations, during which the other processes wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def choose_backend(config: RunConfig) -> str:
    """Return the process-group backend: the config's, or NCCL on CUDA and Gloo otherwise."""
    wanted = config.distributed.backend
    if wanted != "auto":
        return wanted
    cuda = config.training.device == "cuda" or (config.training.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


@dataclass
class Processes:
    """This process's part in a data-parallel run.

    Attributes:
        rank: This process's rank (0 reports).
        world_size: Number of processes W.
        local_rank: Rank on this machine (picks the GPU).
        backend: ``gloo`` or ``nccl``.
        sync: Combines the instruments' sums over a process group of their own.
        signals: The launcher's stop requests (Ctrl-C, another process failed), noted from
            joining the group until :meth:`close`.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    sync: GroupSynchronizer
    signals: "StopSignals"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """Return this process's rows of a global batch ``[N, ...]``: ``[N / W, ...]``."""
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Return ``model`` wrapped for gradient averaging (DistributedDataParallel)."""
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def agree(self, loss: float) -> tuple[float, bool, bool]:
        """Return the global batch's mean loss, and whether any process was asked to stop
        (Ctrl-C; another process failed), in one collective per step.

        Every process takes the same decision at the same step, so none leaves while the others
        are inside a collective with it.
        """
        signals = self.signals
        votes = torch.tensor([loss, float(signals.interrupted), float(signals.peer_stopped)], dtype=torch.float64)
        total = self.sync.sum(votes.to(self.sync.device)).tolist()
        return total[0] / self.world_size, total[1] > 0, total[2] > 0

    def describe(self) -> dict[str, Any]:
        """The manifest's ``processes`` entry."""
        return {"world_size": self.world_size, "backend": self.backend}

    def close(self) -> None:
        """Leave the process group (stop signals are noted until the process ends).

        The training's DistributedDataParallel wrapper holds the group; it is collected first, so
        that the group is not torn down later from a destructor (which can abort the process).
        """
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_processes(config: RunConfig) -> Processes | None:
    """Join the run's process group when launched as one of several processes (else ``None``).

    Selects this process's GPU first when training on CUDA.
    """
    world = environment_world()
    if world is None:
        return None
    rank, world_size, local_rank = world
    resolve_device(config)  # training.device: cuda without a GPU is said as such, not as the backend's need
    backend = choose_backend(config)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise config.fail("distributed.backend", "nccl needs CUDA GPUs and none is available", "use backend: gloo on the CPU")
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_processes > torch.cuda.device_count():
            raise config.fail(
                "distributed.nproc",
                f"{local_processes} processes on this machine need one GPU each, but it has {torch.cuda.device_count()}",
                "start as many processes as there are GPUs (CUDA_VISIBLE_DEVICES chooses them), or use backend: gloo",
            )
        torch.cuda.set_device(local_rank)
    signals = worker_signals()
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    group = dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, world_size, local_rank, backend, GroupSynchronizer(group), signals)
