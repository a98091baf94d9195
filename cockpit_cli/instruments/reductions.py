"""Per-layer reductions of per-sample gradients, in three phases.

For one parameter with per-sample gradients ``G`` (``[N, D_p]``), the reductions any due quantity
asked for are computed in three phases, so that a data-parallel synchronisation can sit between
them and no ``[N, D_p]`` block of a large layer need ever exist:

1. the mean gradient ``g`` (``[D_p]``) of the local batch;
2. one pass over blocks of samples (:mod:`sample_pass`) that sums the :class:`SampleStatistics`:
   ``[D_p]`` vectors (``m2``, ``centered``), ``[N]`` vectors (squared norms, dot products with
   ``g``, projections), histogram counts and the largest magnitude;
3. the kernels below, which read only ``g``, those statistics and the curvature diagonal.

With data-parallel processes (:mod:`sync`), a source holds the local shard's samples only. The
per-coordinate statistics ``g``, ``m2``, ``centered`` and ``h`` are combined across processes
between the phases (:func:`sample_pass.reduce_layer`, the same collectives in the same order on
every process), so every kernel that reads them computes the global batch's value; per-sample
vectors and counts stay local until :meth:`Accumulator.synchronize` combines them after the
backward pass.

Notation: ``G[i]`` is the gradient of sample i's total loss (its data loss plus the regulariser,
so that ``g = mean_i G[i]`` is the mini-batch gradient), ``theta`` the parameter, ``h`` its
curvature diagonal when one was computed in the same backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
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

# How each reduction is combined across data-parallel processes after the backward pass:
# per-sample vectors are gathered, counts summed, ABS_MAX maximised; all others are computed
# from the combined per-coordinate statistics and are global already.
PER_SAMPLE = frozenset({SAMPLE_SQ_NORMS, SAMPLE_DOTS, PROJECTIONS})
COUNTS = frozenset({HIST1D, HIST2D})

GSNR_EPSILON = 1e-5
EB_EPSILON = 1e-5
TIC_EPSILON = 1e-7


# Row blocks of about this many elements bound the temporaries of the reductions.
CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32: fewer, larger blocks run faster, and still fit in the caches


def row_chunks(samples: Tensor) -> list[Tensor]:
    """Split ``[N, D]`` into row blocks of about :data:`CHUNK_ELEMENTS` elements (views)."""
    rows = max(1, CHUNK_ELEMENTS // max(samples.shape[1], 1))
    return [samples[i : i + rows] for i in range(0, samples.shape[0], rows)]


@dataclass
class HistogramSpec:
    """Bins and clamping range of a histogram axis (replace a spec rather than change its fields)."""

    bins: int
    low: float
    high: float

    @cached_property
    def zero_offset(self) -> int | None:
        """Return ``z`` where 0 is an edge of the grid of bins (bin ``z`` starts at 0, ``z`` may lie
        outside ``0..bins``), else ``None``; exact in the floats' rational values, so every
        symmetric range with an even number of bins has ``z = bins / 2``."""
        if not (self.bins > 0 and math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            return None
        offset = -Fraction(self.low) * self.bins / (Fraction(self.high) - Fraction(self.low))
        return int(offset) if offset.denominator == 1 else None

    @cached_property
    def narrow_index(self) -> torch.dtype:
        """Return the narrowest signed integer dtype that holds every bin index, NaN's ``bins``
        included: ``torch.bincount`` reads fewer bytes, and a block's indices take a quarter of
        int32's memory for up to 127 bins."""
        return next(dtype for dtype in (torch.int8, torch.int16, torch.int32, torch.int64) if self.bins <= torch.iinfo(dtype).max)

    def bin_of(self, values: Tensor, consume: bool = False, dtype: torch.dtype = torch.int32) -> Tensor:
        """Return the bin of each value (``dtype``, same shape). ``values`` is left alone, or with
        ``consume=True`` used as the scratch space (overwritten; the bins are the same).

        Values outside the range go to the edge bins; NaN goes to the extra index ``bins``,
        which callers drop, so a non-finite gradient never breaks a histogram. Where 0 is an
        edge (:attr:`zero_offset`), the bin is ``z + floor(value * scale)``: exact in sign, so a
        negative value however small lies below the edge at 0 and a positive one above it
        (factored sources count whole rows of products by their signs and rely on this).
        ``dtype`` must hold ``bins`` (:attr:`narrow_index` is the narrowest that does).
        """
        scale = self.bins / (self.high - self.low)
        zero = self.zero_offset
        if zero is None:
            scaled = (values.sub_(self.low) if consume else values - self.low).mul_(scale)
        else:
            scaled = (values.mul_(scale) if consume else values * scale).floor_().add_(zero)
        return scaled.clamp_(0, self.bins - 1).nan_to_num_(nan=self.bins).to(dtype)  # >= 0: truncation is floor

    def counts_of(self, values: Tensor, consume: bool = False) -> Tensor:
        """Return the counts ``[bins + 1]`` (int64; the last slot: NaN) of the bins of all
        elements of ``values`` (left alone, or with ``consume=True`` overwritten)."""
        return torch.bincount(self.bin_of(values, consume, self.narrow_index).reshape(-1), minlength=self.bins + 1)

    def count(self, samples: Tensor) -> Tensor:
        """Return the counts ``[bins]`` (int64) of all elements of ``[N, D]``, block by block."""
        counts = torch.zeros(self.bins + 1, dtype=torch.int64, device=samples.device)
        for block in row_chunks(samples):
            counts += self.counts_of(block)
        return counts[: self.bins]


# A common refinement is used only up to this many fine bins (its joint counts stay small).
MAX_FINE_BINS = 1024
_GRID_TOLERANCE = 1e-9  # relative: how far a float ratio may be from an integer and still count as one


@dataclass(frozen=True)
class Refinement:
    """Equal-width fine bins whose edges include every edge of two coarser axes.

    Every coarse bin is a run of whole fine bins, so counts over the fine bins determine the
    counts over either coarse axis (:meth:`coarsen`). Fine bins outside a coarse range lie
    wholly below or above it and go to its edge bins, as values outside the range do.

    Attributes:
        fine: The fine axis, over the union of the coarse ranges.
        coarse: The two coarse axes.
        starts: Per coarse axis, the fine bin where its range begins.
        factors: Per coarse axis, fine bins per coarse bin.
    """

    fine: HistogramSpec
    coarse: tuple[HistogramSpec, HistogramSpec]
    starts: tuple[int, int]
    factors: tuple[int, int]

    def coarsen(self, counts: Tensor, axis: int) -> Tensor:
        """Return fine-bin counts grouped into the bins of ``self.coarse[axis]``.

        Args:
            counts: Counts ``[fine.bins, ...]`` over the fine bins (any trailing dimensions).
            axis: Which coarse axis (0 or 1).

        Returns:
            Counts ``[coarse[axis].bins, ...]``: each coarse bin sums its run of fine bins, the
            first and last also the fine bins below and above the coarse range.
        """
        spec, start, factor = self.coarse[axis], self.starts[axis], self.factors[axis]
        stop = start + spec.bins * factor
        grouped = counts[start:stop].reshape(spec.bins, factor, *counts.shape[1:]).sum(1)
        grouped[0] += counts[:start].sum(0)
        grouped[-1] += counts[stop:].sum(0)
        return grouped


def common_refinement(a: HistogramSpec, b: HistogramSpec, max_bins: int = MAX_FINE_BINS) -> Refinement | None:
    """Return the coarsest common refinement of two axes with at most ``max_bins`` fine bins, or ``None``.

    The bin widths must be integer multiples of one fine width and the lows must lie on its grid,
    each up to a relative :data:`_GRID_TOLERANCE`: widths such as 4/100 and 2/40 are not exact in
    binary floating point, and their ratio is 4/5 only up to a rounding error. The defaults (100 bins over ``(-2, 2)``, 40 over ``(-1, 1)``) give 400
    bins of width 0.01 over ``(-2, 2)``.

    The fine bin of a value is ``fine.bin_of(value)``, which rounds differently from
    ``a.bin_of`` or ``b.bin_of`` where ``low`` or the scale differ: a value within a rounding
    error of a bin edge may then land in the neighbouring coarse bin. Where the low is the same
    and the scales differ by a power of two (the 1-D axis of the defaults), the bins agree exactly.

    Args:
        a: A coarse axis.
        b: The other coarse axis.
        max_bins: Most fine bins allowed.

    Returns:
        The refinement, or ``None`` (incommensurate widths, misaligned lows, too many fine bins,
        or an empty or non-finite range).
    """
    widths = [(spec.high - spec.low) / spec.bins if spec.bins > 0 else float("nan") for spec in (a, b)]
    if not all(math.isfinite(w) and w > 0 for w in widths):
        return None
    ratio = Fraction(widths[0] / widths[1]).limit_denominator(max_bins)  # fine bins per a-bin : per b-bin
    if ratio == 0 or abs(widths[0] / widths[1] - float(ratio)) > _GRID_TOLERANCE * float(ratio):
        return None
    low, high = min(a.low, b.low), max(a.high, b.high)
    for multiple in range(1, max_bins + 1):  # finer and finer grids with the same ratio
        factors = (ratio.numerator * multiple, ratio.denominator * multiple)
        width = widths[0] / factors[0]
        bins, starts = (high - low) / width, [(spec.low - low) / width for spec in (a, b)]
        if bins > max_bins + 0.5:
            return None
        if _is_integer(bins) and all(_is_integer(start) for start in starts):
            fine_bins, first = round(bins), (round(starts[0]), round(starts[1]))
            if all(start + spec.bins * factor <= fine_bins for start, spec, factor in zip(first, (a, b), factors)):
                return Refinement(HistogramSpec(fine_bins, low, high), (a, b), first, factors)
    return None


def _is_integer(x: float) -> bool:
    return abs(x - round(x)) <= _GRID_TOLERANCE * max(1.0, abs(x))


@dataclass
class ReductionOptions:
    """Settings of the reductions requested at one step.

    Attributes:
        hist1d: Bins and range of the 1-D histogram.
        hist2d: Bins and ranges of the 2-D histogram (gradient axis, parameter axis).
        direction: Per parameter, the direction ``u_p`` (shape of the parameter) for PROJECTIONS.
            The list is consumed: a backward pass may set a parameter's entry to ``None`` once its
            products are taken, so that a direction as large as the parameters is not kept whole.
    """

    hist1d: HistogramSpec = field(default_factory=lambda: HistogramSpec(100, -2.0, 2.0))
    hist2d: tuple[HistogramSpec, HistogramSpec] = field(default_factory=lambda: (HistogramSpec(40, -1.0, 1.0), HistogramSpec(50, -2.0, 2.0)))
    direction: list[Tensor] | None = None


# Names of the phase-2 statistics (fields of SampleStatistics).
M2 = "m2"
CENTERED = "centered"
CENTERED_SUM = "centered_sum"
SQ_NORMS = "sq_norms"
DOTS = "dots"
PROJECTED = "projected"
HIST1D_COUNTS = "hist1d_counts"
HIST2D_COUNTS = "hist2d_counts"
LARGEST = "largest"


@dataclass
class SampleStatistics:
    """Sums over one parameter's samples (phase 2); each is ``None`` unless it was requested.

    Attributes:
        m2: ``sum_i G[i]^2``, shape ``[D_p]``.
        centered: ``sum_i (G[i] - g)^2``, shape ``[D_p]``.
        centered_sum: ``sum_i ||G[i] - g||^2``, the sum of ``centered`` (scalar; formed without it).
        sq_norms: ``||G[i]||^2``, shape ``[N]``.
        dots: ``G[i] . g``, shape ``[N]``.
        projected: ``G[i] . u`` for the options' direction ``u``, shape ``[N]``.
        hist1d_counts: Counts of all ``G[i, d]``, shape ``[bins]`` (int64).
        hist2d_counts: Joint counts of ``(G[i, d], theta_d)``, shape ``[bins_g, bins_theta]``.
        largest: ``max_id |G[i, d]|`` (scalar).
    """

    m2: Tensor | None = None
    centered: Tensor | None = None
    centered_sum: Tensor | None = None
    sq_norms: Tensor | None = None
    dots: Tensor | None = None
    projected: Tensor | None = None
    hist1d_counts: Tensor | None = None
    hist2d_counts: Tensor | None = None
    largest: Tensor | None = None


@dataclass
class LayerBlock:
    """What the kernels of one parameter read (phase 3): its statistics, never its samples.

    Attributes:
        index: Position of the parameter among the tracked parameters.
        n: Number of samples N of the global batch (0 when only curvature was computed).
        theta: The parameter's value, flattened ``[D_p]``.
        g: Mean gradient of the global batch ``[D_p]``, or ``None``.
        stats: The phase-2 sums (``m2``, ``centered`` and ``centered_sum`` global, the rest local), or ``None``
            without per-sample gradients.
        h: Curvature diagonal of the global batch ``[D_p]``, or ``None``.
    """

    index: int
    n: int
    theta: Tensor
    g: Tensor | None = None
    stats: SampleStatistics | None = None
    h: Tensor | None = None

    @property
    def m2(self) -> Tensor:
        return self.stats.m2

    @property
    def centered(self) -> Tensor:
        return self.stats.centered


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
        self._totals: dict[str, Tensor] = {}
        self._parts: dict[str, list[Tensor]] = {}  # values added since the totals were last combined
        self.per_param: dict[str, list[Tensor | None]] = {}
        self.num_params = num_params
        self.coordinates = 0
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


Kernel = Callable[[LayerBlock, Accumulator, ReductionOptions], None]


def _grad_sq_norm(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(GRAD_SQ_NORM, torch.dot(block.g, block.g))  # no temporary of the layer's size


def _sample_sq_norms(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(SAMPLE_SQ_NORMS, block.stats.sq_norms)


def _sample_dots(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(SAMPLE_DOTS, block.stats.dots)


def _centered_total(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(CENTERED_TOTAL, block.stats.centered_sum)


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
    acc.add(HIST1D, block.stats.hist1d_counts)
    acc.add_per_param(HIST1D, block.index, block.stats.hist1d_counts)


def _hist2d(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(HIST2D, block.stats.hist2d_counts)
    acc.add_per_param(HIST2D, block.index, block.stats.hist2d_counts)


def _projections(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.add(PROJECTIONS, block.stats.projected)


def _abs_max(block: LayerBlock, acc: Accumulator, options: ReductionOptions) -> None:
    acc.maximum(ABS_MAX, block.stats.largest)


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

# Reductions that need the curvature diagonal; all others need per-sample gradients.
NEEDS_CURVATURE = frozenset({TIC_DIAG_SUM, CURVATURE_TRACE})
NEEDS_SAMPLES = frozenset(KERNELS) - {CURVATURE_TRACE}

# The phase-2 statistics each reduction reads (the mean gradient g aside).
STATISTICS: dict[str, frozenset[str]] = {
    SAMPLE_SQ_NORMS: frozenset({SQ_NORMS}),
    SAMPLE_DOTS: frozenset({DOTS}),
    CENTERED_TOTAL: frozenset({CENTERED_SUM}),
    SECOND_MOMENT_TOTAL: frozenset({M2}),
    GSNR_SUM: frozenset({M2}),
    EB_SUM: frozenset({CENTERED}),
    TIC_DIAG_SUM: frozenset({M2}),
    HIST1D: frozenset({HIST1D_COUNTS}),
    HIST2D: frozenset({HIST2D_COUNTS}),
    PROJECTIONS: frozenset({PROJECTED}),
    ABS_MAX: frozenset({LARGEST}),
}
# Reductions that read the mean gradient g, directly or through a statistic.
NEEDS_MEAN = frozenset({GRAD_SQ_NORM, SAMPLE_DOTS, CENTERED_TOTAL, GSNR_SUM, EB_SUM})


def runnable(requested: frozenset[str], samples: bool, curvature: bool) -> frozenset[str]:
    """Return the requested reductions whose inputs exist (per-sample gradients, curvature)."""
    return frozenset(
        name for name in requested if (samples or name not in NEEDS_SAMPLES) and (curvature or name not in NEEDS_CURVATURE)
    )


def statistics_for(requested: frozenset[str]) -> frozenset[str]:
    """Return the phase-2 statistics that the ``requested`` reductions read."""
    return frozenset().union(*(STATISTICS.get(name, frozenset()) for name in requested))


def reduce_block(block: LayerBlock, requested: frozenset[str], acc: Accumulator, options: ReductionOptions) -> None:
    """Phase 3: run every requested kernel that the block has the inputs for.

    A failing kernel is recorded with :meth:`Accumulator.fail` and never raised: this runs inside
    the backward pass, which must complete for training to go on.
    """
    for name in runnable(requested, block.stats is not None, block.h is not None):
        try:
            KERNELS[name](block, acc, options)
        except Exception as error:  # noqa: BLE001 - reported by the quantities that lack the value
            acc.fail({name}, f"{name}: {type(error).__name__}: {error}")
    acc.coordinates += block.theta.numel()
