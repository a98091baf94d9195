"""Phases 1 and 2 of a layer's reductions: the mean gradient, then one pass over sample blocks.

A :class:`SampleSource` hands out one parameter's per-sample gradients ``G`` (``[N, D_p]``) block
by block of samples. It may hold the whole block (:class:`DenseSamples`) or form each block of
samples only when asked, from the layer's inputs and output gradients
(:mod:`factored_gradients`), so that no ``[N, D_p]`` tensor of a large layer ever exists.
:func:`reduce_layer` runs the three phases of :mod:`reductions` on a source.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch import Tensor

from cockpit_cli.instruments import histograms, row_blocks
from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.accumulator import Accumulator
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.sync import Synchronizer


class SampleSource(Protocol):
    """One parameter's per-sample gradients ``G``, ``[N, D_p]``, handed out block by block.

    Attributes:
        n: Samples.
        scratch_blocks: Whether each block is formed for the caller alone, who may overwrite it.
    """

    n: int
    scratch_blocks: bool

    def mean(self) -> Tensor:
        """Return the mean gradient ``g = mean_i G[i]``, shape ``[D_p]``."""

    def take_mean(self, g: Tensor) -> None:
        """Use ``g`` (``[D_p]``, known already: the training's own gradient) as the mean from now on."""

    def blocks(self) -> Iterator[Tensor]:
        """Yield ``G`` in consecutive blocks of samples ``[r, D_p]`` (rows in order); the caller
        releases each block before asking for the next."""

    def products(self, vector: Tensor) -> Tensor:
        """Return ``G[i] . v`` for every sample, ``[N]`` (``vector``: ``[D_p]``)."""

    def square_norms(self) -> Tensor | None:
        """Return ``||G[i]||^2``, ``[N]``, where that needs no blocks, else ``None``."""

    def second_moment(self) -> Tensor | None:
        """Return ``sum_i G[i]^2``, ``[D_p]``, where that needs no blocks, else ``None``."""

    def centered_sum(self, g: Tensor) -> Tensor | None:
        """Return ``sum_i ||G[i] - g||^2`` (scalar) where that needs no blocks, else ``None``."""

    def histogram(self, spec: HistogramSpec) -> Tensor | None:
        """Return the counts ``[spec.bins + 1]`` of all elements (last: NaN) where that needs no blocks, else ``None``."""

    def joint_histogram(self, fine: HistogramSpec, columns: Tensor, width: int) -> Tensor | None:
        """Return the counts of :func:`_joint_counts` over all elements where that needs no blocks, else ``None``."""


class DenseSamples:
    """A source that holds the whole block ``G`` (``[N, *p.shape]``); blocks are views of it."""

    scratch_blocks = False

    def __init__(self, samples: Tensor):
        self.samples = samples.reshape(samples.shape[0], -1)
        self.n = self.samples.shape[0]
        self._mean: Tensor | None = None

    def mean(self) -> Tensor:
        return self.samples.mean(0) if self._mean is None else self._mean

    def take_mean(self, g: Tensor) -> None:
        self._mean = g.reshape(-1)

    def blocks(self) -> Iterator[Tensor]:
        yield from row_blocks.row_chunks(self.samples)

    def products(self, vector: Tensor) -> Tensor:
        return self.samples @ vector

    def square_norms(self) -> None:
        return None

    def second_moment(self) -> None:
        return None

    def centered_sum(self, g: Tensor) -> None:
        return None

    def histogram(self, spec: HistogramSpec) -> None:
        return None

    def joint_histogram(self, fine: HistogramSpec, columns: Tensor, width: int) -> None:
        return None


class ConstantSamples(DenseSamples):
    """A source whose samples all share one gradient ``c`` (``[*p.shape]``): a parameter the
    loss does not use at this step (a layer the forward pass skipped) has the regulariser's
    gradient alone, zero without one. Its blocks are views of ``c``, never copies."""

    def __init__(self, value: Tensor, n: int):
        super().__init__(value.reshape(1, -1).expand(n, -1))

    def mean(self) -> Tensor:
        return self.samples[0].clone() if self._mean is None else self._mean

    def products(self, vector: Tensor) -> Tensor:
        return (self.samples[0] @ vector).repeat(self.n)


def sample_statistics(
    source: SampleSource,
    g: Tensor | None,
    wanted: frozenset[str],
    theta: Tensor,
    options: r.ReductionOptions,
    direction: Tensor | None = None,
) -> r.SampleStatistics:
    """Phase 2: sum the ``wanted`` statistics over the samples in one pass over the blocks.

    Products with a vector (``dots``, ``projected``) come from :meth:`SampleSource.products`,
    and the second moment, squared norms, the centered sum and the 1-D histogram (without the
    2-D one) from :meth:`SampleSource.second_moment`, :meth:`SampleSource.square_norms`,
    :meth:`SampleSource.centered_sum` and :meth:`SampleSource.histogram` where it has them:
    for factored layers these need no blocks (the histogram only the few rows of products that
    span several bins), and no block is formed when nothing else is wanted. Likewise the joint
    counts of both histograms come from :meth:`SampleSource.joint_histogram` where it has them.

    When both histograms are wanted and the 1-D axis and the 2-D gradient axis have a common
    refinement (:func:`histograms.common_refinement`, as the default ranges do), each block gets
    one fine gradient bin per element and one bincount over (fine bin, parameter bin) cells, and
    both histograms are grouped from those joint counts at the end. A gradient within a rounding
    error of a bin edge may then fall in the neighbouring bin compared with
    :meth:`histograms.HistogramSpec.bin_of` on the coarse axis; otherwise the counts are the same.

    Args:
        source: The per-sample gradients ``G``, ``[N, D_p]``.
        g: Mean gradient ``[D_p]`` (needed for ``centered``, ``centered_sum`` and ``dots``).
        wanted: Names of :class:`reductions.SampleStatistics` fields.
        theta: The parameter, flattened ``[D_p]`` (for the 2-D histogram).
        options: Histogram ranges.
        direction: ``u``, flattened ``[D_p]`` (for ``projected``).

    Returns:
        The statistics; those not wanted stay ``None``.
    """
    sums: dict[str, Tensor] = {}
    without_blocks = {name: source.products(vector) for name, vector in ((r.DOTS, g), (r.PROJECTED, direction)) if name in wanted}
    if r.M2 in wanted:
        second_moment = source.second_moment()
        if second_moment is not None:
            without_blocks[r.M2] = second_moment
    if r.SQ_NORMS in wanted and (r.M2 not in wanted or r.M2 in without_blocks):  # else from the blocks' squares
        square_norms = source.square_norms()
        if square_norms is not None:
            without_blocks[r.SQ_NORMS] = square_norms
    if r.CENTERED_SUM in wanted:
        centered_sum = source.centered_sum(g)
        if centered_sum is not None:
            without_blocks[r.CENTERED_SUM] = centered_sum
    if r.HIST1D_COUNTS in wanted and r.HIST2D_COUNTS not in wanted:  # with both, the joint pass bins each element once
        counts = source.histogram(options.hist1d)
        if counts is not None:
            without_blocks[r.HIST1D_COUNTS] = counts
    wanted = wanted - set(without_blocks)
    rows: dict[str, list[Tensor]] = {name: [] for name in wanted & {r.SQ_NORMS}}
    grad_axis, param_axis = options.hist2d
    cells = grad_axis.bins * param_axis.bins
    columns = param_axis.bin_of(theta) if r.HIST2D_COUNTS in wanted else None  # [D_p] int32, NaN -> param_axis.bins
    # Both histograms from one bin index and one bincount per block where the axes allow it.
    refinement = histograms.common_refinement(options.hist1d, grad_axis) if r.HIST1D_COUNTS in wanted and r.HIST2D_COUNTS in wanted else None
    offsets = _cell_offsets(columns, cells, param_axis.bins) if columns is not None and refinement is None else None
    joint = source.joint_histogram(refinement.fine, columns, param_axis.bins) if refinement is not None else None
    if joint is not None:  # from the factors: the blocks need not bin
        wanted = wanted - {r.HIST1D_COUNTS, r.HIST2D_COUNTS}
    for block in source.blocks() if wanted else ():  # [b, D_p]
        if r.M2 in wanted:
            squares = block.square()
            _accumulate(sums, r.M2, squares.sum(0))
            if r.SQ_NORMS in wanted:
                rows[r.SQ_NORMS].append(squares.sum(1))
            del squares
        elif r.SQ_NORMS in wanted:
            rows[r.SQ_NORMS].append(torch.linalg.vector_norm(block, dim=1).square_())  # one pass, no [b, D_p] temporary
        if r.CENTERED in wanted or r.CENTERED_SUM in wanted:
            deviations = block - g  # [b, D_p]
            if r.CENTERED_SUM in wanted:
                flat = deviations.reshape(-1)
                _accumulate(sums, r.CENTERED_SUM, torch.dot(flat, flat))  # one pass: no [b, D_p] of squares
            if r.CENTERED in wanted:
                _accumulate(sums, r.CENTERED, deviations.square_().sum(0))
            del deviations
        if r.LARGEST in wanted:
            low, high = block.aminmax()
            largest = torch.maximum(high, -low)
            sums[r.LARGEST] = largest if r.LARGEST not in sums else torch.maximum(sums[r.LARGEST], largest)
        # The histograms read the block last: a block formed for this pass is their scratch space.
        if refinement is not None and r.HIST2D_COUNTS in wanted:
            counts = _joint_counts(refinement.fine, block, columns, param_axis.bins, consume=source.scratch_blocks)
            joint = counts if joint is None else joint.add_(counts)
            del counts  # before the next block's counts are made
        else:
            if r.HIST1D_COUNTS in wanted:
                last_use = source.scratch_blocks and r.HIST2D_COUNTS not in wanted
                _accumulate(sums, r.HIST1D_COUNTS, options.hist1d.counts_of(block, consume=last_use))
            if r.HIST2D_COUNTS in wanted:
                flat = grad_axis.bin_of(block, consume=source.scratch_blocks).mul_(param_axis.bins).add_(offsets)  # [b, D_p]; NaN anywhere -> >= cells
                _accumulate(sums, r.HIST2D_COUNTS, torch.bincount(flat.reshape(-1), minlength=2 * cells + param_axis.bins + 1))
                del flat
        del block  # before the source forms the next
    stats = r.SampleStatistics(**sums, **without_blocks, **{name: _concatenated(parts) for name, parts in rows.items()})
    if stats.hist1d_counts is not None:
        stats.hist1d_counts = stats.hist1d_counts[: options.hist1d.bins]
    if stats.hist2d_counts is not None:
        stats.hist2d_counts = stats.hist2d_counts[: grad_axis.bins * param_axis.bins].reshape(grad_axis.bins, param_axis.bins)
    if joint is not None:
        fine = joint[: refinement.fine.bins * (param_axis.bins + 1)].reshape(refinement.fine.bins, param_axis.bins + 1)
        stats.hist1d_counts = refinement.coarsen(fine.sum(1), 0)  # [hist1d.bins], the NaN-parameter column included
        stats.hist2d_counts = refinement.coarsen(fine[:, : param_axis.bins], 1)  # [grad_axis.bins, param_axis.bins]
    return stats


def _joint_counts(fine: HistogramSpec, block: Tensor, columns: Tensor, width: int, consume: bool = False) -> Tensor:
    """Return the joint counts of (fine gradient bin, parameter column) over a block.

    The cell of an element is ``fine bin * (width + 1) + column``: a NaN parameter has column
    ``width``, an extra column that the 1-D counts keep and the 2-D counts drop; a NaN gradient
    has fine bin ``fine.bins``, past the last row.

    Args:
        fine: The fine gradient axis.
        block: Per-sample gradients ``[b, D_p]``.
        columns: The parameter-axis bin of each element, ``[D_p]`` (int32; NaN -> ``width``).
        width: Parameter-axis bins.
        consume: Use ``block`` as scratch space (overwritten).

    Returns:
        ``[(fine.bins + 1) * (width + 1)]`` int64: the first ``fine.bins * (width + 1)`` are the
        cells ``[fine.bins, width + 1]``, the rest the counts of NaN gradients.
    """
    flat = fine.bin_of(block, consume).mul_(width + 1).add_(columns)  # [b, D_p]
    return torch.bincount(flat.reshape(-1), minlength=(fine.bins + 1) * (width + 1))


def _cell_offsets(columns: Tensor, cells: int, width: int) -> Tensor:
    """Return what a parameter element adds to ``gradient bin * width`` to index its 2-D cell.

    Args:
        columns: The parameter-axis bin of each element, ``[D_p]`` (int32; NaN -> ``width``).
        cells: Cells of the histogram (gradient bins times ``width``).
        width: Parameter-axis bins.

    Returns:
        ``[D_p]`` int32: the column, or for a NaN parameter ``cells + width``, which puts every
        cell index of that element at ``cells`` or beyond, as a NaN gradient's bin does; those
        indices are dropped.
    """
    return torch.where(columns < width, columns, cells + width).to(torch.int32)


def _concatenated(parts: list[Tensor]) -> Tensor:
    """Return the row blocks ``[b, ...]`` as one ``[N, ...]`` tensor (no copy for a single block)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = value if name not in sums else sums[name].add_(value)


def reduce_layer(
    index: int,
    source: SampleSource | None,
    theta: Tensor,
    curvature: Tensor | None,
    requested: frozenset[str],
    acc: Accumulator,
    options: r.ReductionOptions,
    sync: Synchronizer | None = None,
    mean: Tensor | None = None,
) -> None:
    """Run the three phases for one parameter and add its reductions to ``acc``.

    With data-parallel processes the mean gradient is combined after phase 1, ``m2`` and
    ``centered`` (or its sum) after phase 2 and the curvature diagonal first, in that fixed order and even
    after a local failure, so that every process takes part in the same collectives.

    Args:
        index: Position of the parameter among the tracked parameters.
        source: Its per-sample gradients (the local shard's), or ``None`` when only curvature was computed.
        theta: The parameter ``p.shape``.
        curvature: The curvature diagonal of the local shard's mean loss ``p.shape``, or ``None``.
        requested: Reduction names.
        acc: Where the sums go.
        options: Histogram ranges and projection direction.
        sync: Combines statistics across processes (default: one process).
        mean: The mean gradient where it is known already (``p.shape``: the training's own
            gradient of the parameter, one process only); phase 1 then takes it instead of
            computing it from the per-sample gradients.
    """
    sync = sync or Synchronizer()
    theta = theta.detach().reshape(-1)
    h = None if curvature is None else _shared_mean(sync, curvature.reshape(-1), 1)
    block = r.LayerBlock(index, 0, theta, h=h)
    requested = r.runnable(requested, source is not None, h is not None)
    acc.reached.add(index)
    if source is not None:
        acc.sourced.add(index)
    if source is not None and requested & r.NEEDS_SAMPLES:
        if mean is not None and requested & r.NEEDS_MEAN:
            source.take_mean(mean.detach())
        block.n = source.n * sync.world_size
        wanted = r.statistics_for(requested)
        stats, failure = r.SampleStatistics(), None
        if requested & r.NEEDS_MEAN:  # phase 1
            try:
                local = source.mean()
            except Exception as error:  # noqa: BLE001 - runs inside the backward pass, which must complete
                local, failure = torch.zeros_like(theta), error
            block.g = _shared_mean(sync, local, source.n)
        if failure is None:  # phase 2
            try:
                direction = options.direction[index].reshape(-1).to(theta.dtype) if r.PROJECTED in wanted else None
                stats = sample_statistics(source, block.g, wanted, theta, options, direction)
            except Exception as error:  # noqa: BLE001
                failure = error
        for name in (r.M2, r.CENTERED, r.CENTERED_SUM):
            if name in wanted:
                local = getattr(stats, name)
                if local is None:  # a local failure: this process adds nothing
                    local = theta.new_zeros(()) if name == r.CENTERED_SUM else torch.zeros_like(theta)
                setattr(stats, name, sync.sum(local))
        if failure is None:
            block.stats = stats
        else:
            acc.fail(requested & r.NEEDS_SAMPLES, sample_failure(failure))
            requested -= r.NEEDS_SAMPLES
    r.reduce_block(block, requested, acc, options)  # phase 3


def sample_failure(error: Exception) -> str:
    """Return how a failure of a parameter's per-sample statistics is recorded (:meth:`accumulator.Accumulator.fail`)."""
    return f"per-sample statistics: {type(error).__name__}: {error}"


def _shared_mean(sync: Synchronizer, local_mean: Tensor, weight: int) -> Tensor:
    """Return the mean over processes of equal shards: ``sum_w weight * mean_w / (W * weight)``."""
    if sync.world_size == 1:
        return local_mean
    return sync.sum(local_mean * weight) / (weight * sync.world_size)
