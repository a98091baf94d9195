"""Histogram axes: bins, clamping, bin indices, counts, and the common refinement of two axes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import torch
from torch import Tensor

from cockpit_cli.instruments import row_blocks


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
        for block in row_blocks.row_chunks(samples):
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
