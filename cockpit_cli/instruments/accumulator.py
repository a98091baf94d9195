"""The sums of the reductions over a network's parameters, and their combination across processes."""

from __future__ import annotations

import torch
from torch import Tensor

from cockpit_cli.instruments.reductions import ABS_MAX, COUNTS, KERNELS, PER_SAMPLE
from cockpit_cli.instruments.sync import Synchronizer


class Accumulator:
    """Sums of reductions over parameters (float64 scalars and vectors, counts as int64).

    Values derived from the combined per-coordinate statistics are global already; per-sample
    vectors, counts and maxima are the local shard's until :meth:`synchronize`. The values added
    under a name are kept until :attr:`totals` is read, then summed in one stacked sum (a few
    ops per name, not two per parameter). :meth:`scalar` hands out the scalar totals as Python
    numbers, all of them in one transfer from the device.
    """

    def __init__(self, num_params: int):
        self.errors: list[str] = []  # what failed, in order
        self.failed: set[str] = set()  # reductions whose sums lack a parameter's part (see fail)
        self.dropped: set[str] = set()  # reductions left out at this step alone (see drop)
        self.drop_reason = ""
        self._totals: dict[str, Tensor] = {}
        self._parts: dict[str, list[Tensor]] = {}  # values added since the totals were last combined
        self.per_param: dict[str, list[Tensor | None]] = {}
        self.num_params = num_params
        self.coordinates = 0
        self.sourced: set[int] = set()  # the parameters whose per-sample gradients were reduced
        self.reached: set[int] = set()  # the parameters reduced at all (per-sample gradients, curvature diagonal or both)
        self._scalars: dict[str, float] | None = None  # the scalar totals as Python floats, once read

    @property
    def totals(self) -> dict[str, Tensor]:
        """The sums by name: floating-point ones in float64, counts in int64."""
        for name, parts in self._parts.items():
            current = self._totals.get(name)
            values = parts if current is None else [current, *parts]
            total = values[0] if len(values) == 1 else torch.stack(values)  # promotes to the widest dtype
            total = total.to(torch.float64) if total.is_floating_point() and total.dtype != torch.float64 else total
            self._totals[name] = total if len(values) == 1 else total.sum(0)
        self._parts = {}
        return self._totals

    def scalar(self, name: str) -> float:
        """Return the scalar (0-d, floating-point) total ``name`` as a Python float.

        The first call after a change converts every scalar total together: one stacked tensor and
        one transfer (on a GPU each conversion waits for the device), not one per quantity.
        """
        if self._scalars is None:
            totals = self.totals
            names = [key for key, value in totals.items() if value.dim() == 0 and value.is_floating_point()]
            self._scalars = dict(zip(names, torch.stack([totals[key] for key in names]).tolist() if names else []))
        return self._scalars[name]

    def fail(self, names: frozenset[str] | set[str], error: str) -> None:
        """Record that the reductions ``names`` of a parameter failed with ``error``: their sums,
        missing that parameter's part, must not be read as the whole network's."""
        self.errors.append(error)
        self.failed |= names

    def drop(self, names: frozenset[str] | set[str], reason: str) -> None:
        """Record that the sums ``names`` do not describe this step's loss (a stand-in that
        missed a term of it), while the usual way gives them at other steps: the quantities
        reading them skip the step, saying ``reason``, and stay on."""
        self.dropped |= names
        self.drop_reason = reason

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` (any shape, the same for every call with ``name``) to the sum ``name``."""
        self._parts.setdefault(name, []).append(_detached(value))
        self._scalars = None

    def add_per_param(self, name: str, index: int, value: Tensor) -> None:
        slots = self.per_param.setdefault(name, [None] * self.num_params)
        slots[index] = _detached(value)

    def maximum(self, name: str, value: Tensor) -> None:
        current = self._totals.get(name)
        value = _detached(value).to(torch.float64)
        self._totals[name] = value if current is None else torch.maximum(current, value)
        self._scalars = None

    def synchronize(self, sync: Synchronizer) -> None:
        """Combine the local values across processes (a no-op for one process).

        Per-sample vectors are concatenated in rank order, counts summed, maxima maximised. The
        reductions that failed in any process are combined in none (a process may lack their
        values, and what it has is not read).
        """
        if sync.world_size == 1:
            return
        # Where a process's reductions failed, every process switches the quantities that read them off.
        names = sorted(KERNELS)
        flags = sync.maximum(torch.tensor([float(name in self.failed) for name in names], dtype=torch.float64, device=sync.device))
        elsewhere = {name for name, flag in zip(names, flags.tolist()) if flag > 0} - self.failed
        if elsewhere:
            self.fail(elsewhere, "a reduction it reads failed in another process")
        for name in sorted(set(self.totals) - self.failed):
            if name in PER_SAMPLE:
                self.totals[name] = sync.gather(self.totals[name])
            elif name in COUNTS:
                self.totals[name] = sync.sum(self.totals[name])
            elif name == ABS_MAX:
                self.totals[name] = sync.maximum(self.totals[name])
        self._scalars = None
        for name in sorted(set(self.per_param) - self.failed):
            if name in COUNTS:
                self.per_param[name] = [None if value is None else sync.sum(value) for value in self.per_param[name]]


def _detached(value: Tensor) -> Tensor:
    """Return ``value`` cut from the graph (itself where it is in none, as inside the backward pass)."""
    return value.detach() if value.requires_grad else value
