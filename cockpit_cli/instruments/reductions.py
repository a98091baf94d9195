"""Fused per-layer reductions of per-sample gradients.

While one parameter's block of per-sample gradients ``G`` (``[N, D_p]``) is in memory, every
reduction that any due quantity asked for is computed from it, and the block is dropped. Every
reduction is a sum over samples or over coordinates, so it can also be summed across
data-parallel workers.

Notation: ``G[i]`` is the gradient of sample i's total loss (its data loss plus the regulariser,
so that ``g = mean_i G[i]`` is the mini-batch gradient), ``theta`` the parameter, ``h`` its
curvature diagonal when one was computed in the same backward pass.

With data-parallel processes (:mod:`sync`), a block holds the local shard's rows only. The
per-coordinate statistics ``g``, ``m2``, ``centered`` and ``h`` are combined across processes
when first used (all processes use them in the same order, see :func:`reduce_block`), so every
kernel that reads them computes the global batch's value; per-sample vectors and counts stay
local until :meth:`Accumulator.synchronize` combines them after the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from cockpit_cli.instruments.sync import Synchronizer

# Names of the reductions quantities may request.
GRAD_SQ_NORM = "grad_sq_norm"  # scalar: ||g||^2
SAMPLE_SQ_NORMS = "sample_sq_norms"  # [N]: ||g_i||^2
SAMPLE_DOTS = "sample_dots"  # [N]: g_i . g
CENTERED_TOTAL = "centered_total"  # scalar: sum_i ||g_i - g||^2
SECOND_MOMENT_TOTAL = "second_moment_total"  # scalar: sum_d (1/N) sum_i g_id^2
GSNR_SUM = "gsnr_sum"  # scalar: sum_d g_d^2 / ((1/N) sum_i g_id^2 - g_d^2 + 1e-5)
EB_SUM = "eb_sum"  # scalar: sum_d g_d^2 / (sigma_d^2 + 1e-5), sigma^2 unbiased
TIC_DIAG_SUM = "tic_diag_sum"  # scalar: sum_d (1/N) sum_i g_id^2 / (h_d + 1e-7)
CURVATURE_TRACE = "curvature_trace"  # scalar and per parameter: sum_d h_d
HIST1D = "hist1d"  # [bins] and per parameter: counts of all g_id
HIST2D = "hist2d"  # [bins_g, bins_theta]: joint counts of (g_id, theta_d)
PROJECTIONS = "projections"  # [N]: g_i . u for a direction u given in the options
ABS_MAX = "abs_max"  # scalar: max_id |g_id| (for adaptive histogram ranges)

# How each reduction is combined across data-parallel processes: per-sample vectors are
# gathered, counts summed, ABS_MAX maximised; all others are computed from the combined
# per-coordinate statistics a kernel reads (SHARED_STATISTICS) and are global already.
PER_SAMPLE = frozenset({SAMPLE_SQ_NORMS, SAMPLE_DOTS, PROJECTIONS})
COUNTS = frozenset({HIST1D, HIST2D})
SHARED_STATISTICS: dict[str, tuple[str, ...]] = {
    GRAD_SQ_NORM: ("g",),
    SAMPLE_DOTS: ("g",),
    CENTERED_TOTAL: ("g", "centered"),
    SECOND_MOMENT_TOTAL: ("m2",),
    GSNR_SUM: ("g", "m2"),
    EB_SUM: ("g", "centered"),
    TIC_DIAG_SUM: ("m2",),
}

GSNR_EPSILON = 1e-5
EB_EPSILON = 1e-5
TIC_EPSILON = 1e-7


# Row blocks of about this many elements bound the temporaries of the reductions.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(samples: Tensor) -> list[Tensor]:
    """Split ``[N, D]`` into row blocks of about :data:`CHUNK_ELEMENTS` elements (views)."""
    rows = max(1, CHUNK_ELEMENTS // max(samples.shape[1], 1))
    return [samples[i : i + rows] for i in range(0, samples.shape[0], rows)]


@dataclass
class HistogramSpec:
    """Bins and clamping range of a histogram axis."""

    bins: int
    low: float
    high: float

    def bin_of(self, values: Tensor) -> Tensor:
        """Return the bin of each value (int32, same shape; never modifies ``values``).

        Values outside the range go to the edge bins; NaN goes to the extra index ``bins``,
        which callers drop, so a non-finite gradient never breaks a histogram.
        """
        scaled = (values - self.low) * (self.bins / (self.high - self.low))
        return scaled.clamp_(0, self.bins - 1).nan_to_num_(nan=self.bins).to(torch.int32)  # >= 0: truncation is floor

    def count(self, samples: Tensor) -> Tensor:
        """Return the counts ``[bins]`` (int64) of all elements of ``[N, D]``, block by block."""
        counts = torch.zeros(self.bins + 1, dtype=torch.int64, device=samples.device)
        for block in row_chunks(samples):
            counts += torch.bincount(self.bin_of(block).reshape(-1), minlength=self.bins + 1)
        return counts[: self.bins]


@dataclass
class ReductionOptions:
    """Settings of the reductions requested at one step.

    Attributes:
        hist1d: Bins and range of the 1-D histogram.
        hist2d: Bins and ranges of the 2-D histogram (gradient axis, parameter axis).
        direction: Per parameter, the direction ``u_p`` (shape of the parameter) for PROJECTIONS.
    """

    hist1d: HistogramSpec = field(default_factory=lambda: HistogramSpec(100, -2.0, 2.0))
    hist2d: tuple[HistogramSpec, HistogramSpec] = field(default_factory=lambda: (HistogramSpec(40, -1.0, 1.0), HistogramSpec(50, -2.0, 2.0)))
    direction: list[Tensor] | None = None


class LayerBlock:
    """One parameter's per-sample gradients and the intermediates derived from them (cached).

    Args:
        index: Position of the parameter among the tracked parameters.
        samples: ``G``, shape ``[N, *p.shape]`` (or ``None`` if only curvature was computed).
        theta: The parameter's value, shape ``p.shape``.
        curvature: Curvature diagonal of the local shard's mean loss, shape ``p.shape``, or ``None``.
        sync: Combines statistics across data-parallel processes (default: one process).
    """

    def __init__(self, index: int, samples: Tensor | None, theta: Tensor, curvature: Tensor | None = None, sync: Synchronizer | None = None):
        self.index = index
        self.sync = sync or Synchronizer()
        self.G = None if samples is None else samples.reshape(samples.shape[0], -1)
        self.theta = theta.detach().reshape(-1)
        self.h = None if curvature is None else self._global_curvature(curvature.reshape(-1))

    def _global_curvature(self, local: Tensor) -> Tensor:
        """The global batch's curvature diagonal: the mean of the equal shards' diagonals."""
        world = self.sync.world_size
        return local if world == 1 else self.sync.sum(local) / world

    @property
    def n(self) -> int:
        """Samples in the global batch (equal shards on every process)."""
        return self.G.shape[0] * self.sync.world_size

    @cached_property
    def g(self) -> Tensor:
        """Mean gradient of the global batch ``[D_p]``."""
        return self.sync.sum(self.G.sum(0)) / self.n

    @cached_property
    def m2(self) -> Tensor:
        """``sum_i g_id^2`` over the global batch, shape ``[D_p]``."""
        return self.sync.sum(self.G.pow(2).sum(0))

    @cached_property
    def centered(self) -> Tensor:
        """``sum_i (g_id - g_d)^2`` over the global batch, shape ``[D_p]`` (summed block by block)."""
        return self.sync.sum(sum((block - self.g).pow(2).sum(0) for block in row_chunks(self.G)))

    def share(self, requested: frozenset[str]) -> None:
        """Combine, in a fixed order, the per-coordinate statistics the requested kernels read,
        so that every process takes part in the same collectives whatever happens next."""
        wanted = set().union(*(SHARED_STATISTICS.get(name, ()) for name in requested))
        for statistic in ("g", "m2", "centered"):
            if statistic in wanted:
                getattr(self, statistic)

    @cached_property
    def sq_norms(self) -> Tensor:
        """``||g_i||^2``, shape ``[N]`` (block by block, no ``[N, D_p]`` temporary)."""
        return torch.cat([block.pow(2).sum(1) for block in row_chunks(self.G)])


class Accumulator:
    """Sums of reductions over parameters (float64 scalars and vectors, counts as int64).

    Values derived from the combined per-coordinate statistics are global already; per-sample
    vectors, counts and maxima are the local shard's until :meth:`synchronize`.
    """

    def __init__(self, num_params: int):
        self.errors: list[str] = []
        self.totals: dict[str, Tensor] = {}
        self.per_param: dict[str, list[Tensor | None]] = {}
        self.num_params = num_params
        self.coordinates = 0

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach()
        value = value.to(torch.float64) if value.is_floating_point() else value
        current = self.totals.get(name)
        self.totals[name] = value if current is None else current + value

    def add_per_param(self, name: str, index: int, value: Tensor) -> None:
        slots = self.per_param.setdefault(name, [None] * self.num_params)
        slots[index] = value.detach()

    def maximum(self, name: str, value: Tensor) -> None:
        current = self.totals.get(name)
        value = value.detach().to(torch.float64)
        self.totals[name] = value if current is None else torch.maximum(current, value)

    def synchronize(self, sync: Synchronizer) -> None:
        """Combine the local values across processes (a no-op for one process).

        Per-sample vectors are concatenated in rank order, counts summed, maxima maximised.
        """
        if sync.world_size == 1:
            return
        for name in sorted(self.totals):
            if name in PER_SAMPLE:
                self.totals[name] = sync.gather(self.totals[name])
            elif name in COUNTS:
                self.totals[name] = sync.sum(self.totals[name])
            elif name == ABS_MAX:
                self.totals[name] = sync.maximum(self.totals[name])
        for name in sorted(self.per_param):
            if name in COUNTS:
                self.per_param[name] = [None if value is None else sync.sum(value) for value in self.per_param[name]]


Kernel = Callable[[LayerBlock, Accumulator, ReductionOptions], None]


def _grad_sq_norm(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(GRAD_SQ_NORM, block.g.pow(2).sum())


def _sample_sq_norms(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(SAMPLE_SQ_NORMS, block.sq_norms)


def _sample_dots(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(SAMPLE_DOTS, block.G @ block.g)


def _centered_total(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(CENTERED_TOTAL, block.centered.sum())


def _second_moment_total(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(SECOND_MOMENT_TOTAL, block.m2.sum() / block.n)


def _gsnr_sum(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    mean_square = block.g.pow(2)
    acc.add(GSNR_SUM, (mean_square / (block.m2 / block.n - mean_square + GSNR_EPSILON)).sum())


def _eb_sum(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    variance = block.centered / (block.n - 1)
    acc.add(EB_SUM, (block.g.pow(2) / (variance + EB_EPSILON)).sum())


def _tic_diag_sum(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(TIC_DIAG_SUM, ((block.m2 / block.n) / (block.h + TIC_EPSILON)).sum())


def _curvature_trace(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    trace = block.h.sum()
    acc.add(CURVATURE_TRACE, trace)
    acc.add_per_param(CURVATURE_TRACE, block.index, trace)


def _hist1d(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    counts = options.hist1d.count(block.G)
    acc.add(HIST1D, counts)
    acc.add_per_param(HIST1D, block.index, counts)


def _hist2d(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    grad_axis, param_axis = options.hist2d
    columns = param_axis.bin_of(block.theta)  # [D_p], NaN -> param_axis.bins
    cells = grad_axis.bins * param_axis.bins
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=block.G.device)
    for rows in (grad_axis.bin_of(chunk) for chunk in row_chunks(block.G)):  # [r, D_p], NaN -> grad_axis.bins
        flat = torch.where((rows < grad_axis.bins) & (columns < param_axis.bins), rows * param_axis.bins + columns, cells)
        counts += torch.bincount(flat.reshape(-1), minlength=cells + 1)
    counts = counts[:cells].reshape(grad_axis.bins, param_axis.bins)
    acc.add(HIST2D, counts)
    acc.add_per_param(HIST2D, block.index, counts)


def _projections(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    direction = options.direction[block.index].reshape(-1).to(block.G.dtype)
    acc.add(PROJECTIONS, block.G @ direction)


def _abs_max(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.maximum(ABS_MAX, block.G.abs().max())


KERNELS: dict[str, Kernel] = {
    GRAD_SQ_NORM: _grad_sq_norm,
    SAMPLE_SQ_NORMS: _sample_sq_norms,
    SAMPLE_DOTS: _sample_dots,
    CENTERED_TOTAL: _centered_total,
    SECOND_MOMENT_TOTAL: _second_moment_total,
    GSNR_SUM: _gsnr_sum,
    EB_SUM: _eb_sum,
    TIC_DIAG_SUM: _tic_diag_sum,
    CURVATURE_TRACE: _curvature_trace,
    HIST1D: _hist1d,
    HIST2D: _hist2d,
    PROJECTIONS: _projections,
    ABS_MAX: _abs_max,
}

# Reductions that need the curvature diagonal; all others need the per-sample block.
NEEDS_CURVATURE = frozenset({TIC_DIAG_SUM, CURVATURE_TRACE})
NEEDS_SAMPLES = frozenset(KERNELS) - {CURVATURE_TRACE}


def reduce_block(block: LayerBlock, requested: frozenset[str], acc: Accumulator, options: ReductionOptions) -> None:
    """Run every requested kernel that the block has the inputs for.

    A failing kernel is recorded in ``acc.errors`` and never raised: this runs inside the
    backward pass, which must complete for training to go on.
    """
    runnable = [name for name in KERNELS if name in requested and _has_inputs(block, name)]
    if block.G is not None:
        block.share(frozenset(runnable))
    for name in runnable:
        try:
            KERNELS[name](block, acc, options)
        except Exception as error:  # noqa: BLE001 - reported by the quantities that lack the value
            acc.errors.append(f"{name}: {type(error).__name__}: {error}")
    acc.coordinates += block.theta.numel()


def _has_inputs(block: LayerBlock, name: str) -> bool:
    if name in NEEDS_SAMPLES and block.G is None:
        return False
    return not (name in NEEDS_CURVATURE and block.h is None)
