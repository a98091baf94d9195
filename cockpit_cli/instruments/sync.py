"""Combining the instruments' sums across data-parallel processes.

With ``W`` processes, each holds an equal shard of ``n = N / W`` samples of every global batch.
Every statistic the instruments need is a sum over samples (or, for histogram ranges, a
maximum), so it is exact to compute it on the local shard and combine it:

- per-coordinate sums (``sum_i g_i``, ``sum_i g_i^2``, ``sum_i (g_i - g)^2``) and curvature
  diagonals: summed (:meth:`Synchronizer.sum`),
- per-sample vectors (``||g_i||^2``, ``g_i . g``, individual losses): concatenated in rank order,
  which is the global batch's order (:meth:`Synchronizer.gather`),
- histogram counts: summed; largest magnitudes: maximum.

:class:`Synchronizer` is the single-process case, where every operation returns its input;
:class:`GroupSynchronizer` does the same over a ``torch.distributed`` process group. Every
process must call the same operations in the same order (collectives match by order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Synchronizer:
    """One process: nothing to combine. ``world_size`` is 1."""

    world_size = 1
    rank = 0

    def sum(self, tensor: Tensor) -> Tensor:
        """Return the sum of ``tensor`` over processes (any shape; the input is not modified)."""
        return tensor

    def maximum(self, tensor: Tensor) -> Tensor:
        """Return the elementwise maximum of ``tensor`` over processes."""
        return tensor

    def gather(self, tensor: Tensor) -> Tensor:
        """Return the processes' ``[n, ...]`` tensors concatenated along dim 0 in rank order: ``[W n, ...]``."""
        return tensor

    def mean(self, value: float) -> float:
        """Return the mean of a float over processes (of equal shards: the global batch's mean)."""
        return value


class GroupSynchronizer(Synchronizer):
    """Several processes, combined over ``group`` (its own group, apart from the gradients').

    Args:
        group: The process group (``None``: the default group).
    """

    def __init__(self, group: object | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # Where tensors of this group's collectives live: the current GPU for NCCL, else the CPU.
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def sum(self, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def maximum(self, tensor: Tensor) -> Tensor:
        largest = tensor.detach().clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.group)
        return largest

    def gather(self, tensor: Tensor) -> Tensor:
        local = tensor.detach().contiguous()
        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(pieces, local, group=self.group)
        return torch.cat(pieces)

    def mean(self, value: float) -> float:
        total = self.sum(torch.tensor([value], dtype=torch.float64, device=self.device))
        return float(total) / self.world_size


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` says that a collective failed (a peer process is gone)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error).lower())


def joined_process_group() -> Synchronizer:
    """Return a :class:`GroupSynchronizer` over a group of its own where this process already
    belongs to a ``torch.distributed`` group of several processes (a loop the user launched under
    ``torchrun`` with ``DistributedDataParallel``), else the single process's. Every process of
    the group must call it (it creates a group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GroupSynchronizer(dist.new_group(backend=dist.get_backend()))
    return Synchronizer()
