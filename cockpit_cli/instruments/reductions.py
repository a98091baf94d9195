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
vectors and counts stay local until :meth:`accumulator.Accumulator.synchronize` combines them after the
backward pass.

Notation: ``G[i]`` is the gradient of sample i's total loss (its data loss plus the regulariser,
so that ``g = mean_i G[i]`` is the mini-batch gradient), ``theta`` the parameter, ``h`` its
curvature diagonal when one was computed in the same backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from cockpit_cli.instruments.histograms import HistogramSpec

if TYPE_CHECKING:
    from cockpit_cli.instruments.accumulator import Accumulator

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


Kernel = Callable[[LayerBlock, "Accumulator", ReductionOptions], None]


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
