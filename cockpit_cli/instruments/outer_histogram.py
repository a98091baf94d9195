"""Histogram of the elements of outer products, counting most rows without forming them.

The per-sample weight gradient of a Linear layer (one position per sample, no regulariser) is
an outer product: row ``a`` of sample ``i`` holds the products ``c_ia * x_ib`` of one number
``c_ia = N delta_ia`` with the layer's input ``x_i`` (``[K]``). Per-sample gradients are mostly
much smaller than a histogram's bins, so most rows fall into the bin or two around 0, and such
a row's counts follow from ``c_ia``, the largest ``|x_ib|`` and the signs of ``x_i``, without
its ``K`` products. Only the other rows are formed and binned.

Exactness: rounding is monotone, so every computed product of a row has magnitude at most
``reach = |c| * max|x|`` computed in the same dtype, and :meth:`HistogramSpec.bin_of` is
monotone, so a product ``p`` with ``tiny <= p <= reach`` has ``bin_of(tiny) <= bin_of(p) <=
bin_of(reach)``. A :class:`SignRule` holds the largest ``reach`` for which both ends (and the
negative ones) give the same bin; the counts are then those :meth:`HistogramSpec.bin_of` gives
the formed products, to the element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
from torch import Tensor

from cockpit_cli.instruments import row_blocks
from cockpit_cli.instruments.histograms import HistogramSpec

# Form the remaining rows only while they are at most this share of all rows: forming a row
# from gathered factors costs a little more than a row of the dense block.
MAX_FORMED_SHARE = 0.75
_SEARCH_POINTS = 1024  # candidate thresholds per round of the search


@dataclass(frozen=True)
class SignRule:
    """Which bins the products of a row with ``reach <= limit`` fall into.

    Attributes:
        limit: The largest reach counted by signs.
        positive: The bin of every product in ``[0, limit]`` (exact zeros included).
        negative: The bin of every product in ``[-limit, -tiny]``.
        tiny: The smallest positive normal number of the dtype: no nonzero product may be smaller.
    """

    limit: float
    positive: int
    negative: int
    tiny: float


@lru_cache(maxsize=64)
def sign_rule(bins: int, low: float, high: float, dtype: torch.dtype) -> SignRule | None:
    """Return the :class:`SignRule` of a histogram axis for values of ``dtype``, or ``None`` when
    none holds (the bins beside 0 narrower than the dtype's smallest normal number).

    The limit is found by a search over the dtype's positive floats, in the order of their bit
    patterns (which is their order), evaluating ``bin_of`` on ``_SEARCH_POINTS`` candidates per
    round: the condition ``bin_of(t) == positive and bin_of(-t) == negative`` holds for every
    ``t`` from ``tiny`` to the limit and for none above it, since ``bin_of`` is monotone.
    """
    spec = HistogramSpec(bins, low, high)
    info = torch.finfo(dtype)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    ends = torch.tensor([info.tiny, float("inf")], dtype=dtype)
    positive, negative = (int(b) for b in spec.bin_of(torch.cat([ends[:1], -ends[:1]])))
    zero_bins = spec.bin_of(torch.tensor([0.0, -0.0], dtype=dtype)).tolist()
    if zero_bins != [positive, positive]:
        return None

    def holds(candidates: Tensor) -> Tensor:
        return (spec.bin_of(candidates) == positive) & (spec.bin_of(-candidates) == negative)

    def pattern(values: list[float]) -> list[int]:
        return torch.tensor(values, dtype=dtype).view(bits).tolist()

    low_bits, high_bits = pattern([info.tiny, math.inf])
    if bool(holds(ends[1:])):  # one bin each side (or one bin): still, an infinite reach may hide inf * 0 = NaN
        return SignRule(info.max, positive, negative, info.tiny)
    guess = _limit_guess(spec)  # the distance from 0 to the nearest edge beside it, up to rounding
    if math.isfinite(guess) and guess > info.tiny:
        margin = 64 * info.eps  # the limit differs from the guess by a few roundings
        near = torch.tensor([guess * (1 - margin), guess * (1 + margin)], dtype=dtype)
        inside, outside = holds(near).tolist()
        if inside and not outside:  # bracketed: search only between them
            low_bits, high_bits = pattern(near.tolist())
    while high_bits - low_bits > 1:  # holds at low_bits, fails at high_bits
        count = min(_SEARCH_POINTS, high_bits - low_bits + 1)
        points = [low_bits + (high_bits - low_bits) * k // (count - 1) for k in range(count)]  # exact integers, both ends included
        passing = holds(torch.tensor(points, dtype=torch.int64).to(bits).view(dtype)).nonzero()
        last = int(passing[-1]) if passing.numel() else 0
        low_bits, high_bits = points[last], points[last + 1]
    limit = float(torch.tensor([low_bits], dtype=torch.int64).to(bits).view(dtype))
    return SignRule(limit, positive, negative, info.tiny)


def _limit_guess(spec: HistogramSpec) -> float:
    """Return the distance from 0 to the nearest bin edge that separates values around 0 (the edge at
    0 itself excepted, and the outer edges, beyond which values are clamped), ``inf`` if none."""
    width = (spec.high - spec.low) / spec.bins
    zero = spec.zero_offset
    if zero is not None and 0 < zero < spec.bins:
        return width
    edges = [spec.low + k * width for k in range(1, spec.bins)]  # inner edges
    return min((abs(edge) for edge in edges if edge != 0.0), default=math.inf)


@dataclass
class RowSplit:
    """Which rows of the outer products a :class:`SignRule` counts and which must be formed.

    Counts are kept as 0/1 numbers rather than masks: on the CPU, arithmetic on them runs many
    times faster than filling by a mask or converting a mask to numbers.

    Attributes:
        rule: The rule.
        counted: ``[N, C_out]`` float32 (float64 for float64 factors): 1 where a row is counted
            from signs, 0 where it is formed (sums over up to 2^24 rows are exact).
        formed: How many rows are formed.
    """

    rule: SignRule
    counted: Tensor
    formed: int

    @property
    def remaining(self) -> Tensor:
        """``[N, C_out]`` bool: the rows to form."""
        return self.counted == 0


def split_rows(scaled: Tensor, inputs: Tensor, spec: HistogramSpec) -> RowSplit | None:
    """Return which rows of ``scaled[i, a] * inputs[i, b]`` ``spec``'s sign rule counts, or ``None``
    where no rule holds, where a nonzero product could lie below the dtype's smallest normal
    number (and need not get the rule's bin), or where more than :data:`MAX_FORMED_SHARE` of the
    rows would still be formed.

    Args:
        scaled: ``c``, ``[N, C_out]``.
        inputs: ``x``, ``[N, K]``.
        spec: The histogram axis.
    """
    rule = sign_rule(spec.bins, spec.low, spec.high, scaled.dtype) if scaled.dtype == inputs.dtype else None
    if rule is None:
        return None
    size = inputs.abs()
    largest_input, smallest_input = size.amax(1, keepdim=True), _smallest_nonzero(size)
    del size  # at most two temporaries of the factors' size at once
    reach = scaled.abs()
    smallest = _smallest_nonzero(reach) * smallest_input
    # reach = |c| max|x| <= limit as 1 or 0: the sign of limit - reach is exact (0 only where they
    # are equal), and NaN (from a NaN or an infinity anywhere) is taken as above the limit.
    counted = reach.mul_(largest_input).neg_().add_(rule.limit).nan_to_num_(nan=-1.0).sign_().add_(1).clamp_max_(1)
    counted = counted.to(torch.promote_types(counted.dtype, torch.float32))  # half precision counts exactly only to 2^8 or 2^11
    total, smallest = torch.stack([_exact_sum(counted), smallest.double()]).tolist()  # one transfer
    formed = counted.numel() - int(total)
    if formed > MAX_FORMED_SHARE * counted.numel() or smallest < rule.tiny:
        return None
    return RowSplit(rule, counted, formed)


def _smallest_nonzero(magnitudes: Tensor) -> Tensor:
    """Return the smallest positive entry of a tensor of magnitudes (``>= 0`` or NaN), NaN left
    out (``inf`` if there is none), as a 0-d tensor.

    Found on the bit patterns, whose order as integers is the order of non-negative floats (0 is
    pattern 0, NaN lies above inf): subtracting 1 turns 0 into -1, which clearing the sign bit makes
    the largest pattern, so the smallest result is the smallest positive entry's pattern less 1;
    results from inf's pattern less 1 up (NaN and 0 only) give inf. Integer arithmetic, unlike
    filling by a mask, runs at the speed of a copy on the CPU.
    """
    bits, inf_pattern = _patterns(magnitudes.dtype)
    lowest = magnitudes.view(bits).sub(1).bitwise_and_(torch.iinfo(bits).max).amin()
    return lowest.clamp_(max=inf_pattern - 1).add_(1).view(magnitudes.dtype)


@lru_cache(maxsize=8)
def _patterns(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """Return the integer dtype of ``dtype``'s size and the bit pattern of ``inf`` in it."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    return bits, int(torch.tensor(torch.inf, dtype=dtype).view(bits))


def _negative_products(scaled: Tensor, inputs: Tensor, counted: Tensor) -> Tensor:
    """Return how many products of the counted rows are negative (float64 0-d, exact).

    Per sample, the counted rows with ``c > 0`` times the inputs ``< 0`` plus those with ``c < 0``
    times the inputs ``> 0`` is ``(a b - s t) / 2``: ``s`` is the sum of the counted rows' signs
    and ``a`` the sum of their absolute values (the rows with ``c != 0``), ``t`` and ``b`` the
    same of the inputs' signs.
    """
    rows, signs = _counted_signs(scaled, inputs, counted)
    s, t = rows.sum(1).double(), signs.sum(1).double()  # [N]: sums of at most 2^24 -1/0/1 are exact
    a, b = rows.abs_().sum(1).double(), signs.abs_().sum(1).double()
    return (a.mul_(b) - s.mul_(t)).sum() / 2


def _negative_products_per_element(scaled: Tensor, inputs: Tensor, counted: Tensor) -> Tensor:
    """Return how many counted rows have a negative product at each element ``(a, b)``, ``[C_out, K]``
    float64: ``(|S|^T |T| - S^T T) / 2`` for the counted rows' signs ``S`` and the inputs' signs
    ``T`` (``|.|`` elementwise), by the same reasoning as :func:`_negative_products`."""
    rows, signs = _counted_signs(scaled, inputs, counted)
    return (rows.abs().T @ signs.abs()).sub_(rows.T @ signs).double().div_(2)


def _counted_signs(scaled: Tensor, inputs: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Return the signs of the counted rows' ``c`` (0 on formed rows), ``[N, C_out]``, and of the
    inputs, ``[N, K]``: float32 -1, 0 or 1 (NaN and -0.0: 0), whose sums and matrix products are
    exact up to 2^24 terms."""
    return _signs(scaled).mul_(counted), _signs(inputs)


def _exact_sum(counted: Tensor) -> Tensor:
    """Return the sum of a ``[N, C_out]`` 0/1 float32 or float64 tensor as a float64 0-d tensor,
    exact: each row's sum in the tensor's dtype, the rows' sums in float64 (a float64 sum of the
    whole tensor would first copy it to float64)."""
    return counted.sum(1).double().sum()


def _signs(values: Tensor) -> Tensor:
    """Return the signs of ``values`` as float32 -1, 0 or 1 (NaN and -0.0: 0), same shape."""
    return values.nan_to_num(nan=0.0).sign_().float()


def formed_row_bins(scaled: Tensor, inputs: Tensor, split: RowSplit, spec: HistogramSpec, dtype: torch.dtype = torch.int32) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield the bins ``[m, K]`` (``dtype``, as ``spec.bin_of`` bins them) of the remaining rows'
    products (computed as the layer's blocks compute them), about :data:`row_blocks.CHUNK_ELEMENTS` products at a
    time (a sample's rows may be split over several blocks), with each row's output index ``a``
    (``[m]``), in the order of ``split.remaining``'s true entries.

    A block's products are formed in its gathered inputs and binned in place, so one block of
    products and its bins are all that is held; callers release each block's bins before asking
    for the next.
    """
    if not split.formed:
        return
    most = max(1, row_blocks.CHUNK_ELEMENTS // max(inputs.shape[1], 1))
    for pairs in split.remaining.nonzero().split(most):  # [m, 2]: (sample i, output a)
        samples, outputs = pairs[:, 0], pairs[:, 1]
        products = inputs.index_select(0, samples).mul_(scaled[samples, outputs].unsqueeze(1))  # x_ib * c_ia == c_ia * x_ib
        bins = spec.bin_of(products, consume=True, dtype=dtype)
        del products
        yield bins, outputs
        del bins  # before the next block is formed


def outer_histogram(scaled: Tensor, inputs: Tensor, spec: HistogramSpec) -> Tensor | None:
    """Return the counts ``[spec.bins + 1]`` (int64; the last slot: NaN) of the products
    ``scaled[i, a] * inputs[i, b]`` over all ``i, a, b``, as ``spec.bin_of`` bins them; ``None``
    where :func:`split_rows` declines.

    Args:
        scaled: ``c``, ``[N, C_out]``.
        inputs: ``x``, ``[N, K]``.
        spec: The histogram axis.
    """
    split = split_rows(scaled, inputs, spec)
    if split is None:
        return None
    rule = split.rule
    counts = torch.zeros(spec.bins + 1, dtype=torch.int64, device=scaled.device)
    in_rule = _exact_sum(split.counted) * inputs.shape[1]
    if rule.negative != rule.positive:  # negative products: x of the sign opposite to c's
        negatives = _negative_products(scaled, inputs, split.counted)
        counts[rule.negative] += negatives.long()
        in_rule = in_rule - negatives
    counts[rule.positive] += in_rule.long()
    for bins, _ in formed_row_bins(scaled, inputs, split, spec, spec.narrow_index):
        counts += torch.bincount(bins.reshape(-1), minlength=spec.bins + 1)
        del bins
    return counts


def outer_joint_histogram(scaled: Tensor, inputs: Tensor, fine: HistogramSpec, columns: Tensor, width: int) -> Tensor | None:
    """Return the joint counts of (fine gradient bin, parameter column) over all products
    ``scaled[i, a] * inputs[i, b]``, the element ``(a, b)`` in column ``columns[a * K + b]``; the
    layout of :func:`sample_pass._joint_counts` (cell ``bin * (width + 1) + column``, NaN
    gradients in the rows past ``fine.bins``); ``None`` where :func:`split_rows` declines.

    The counted rows' products with ``x_ib`` of the sign opposite to ``c_ia`` are negative, so per
    element ``(a, b)`` the number of counted rows with a negative product is
    ``sum_i [c_ia > 0] [x_ib < 0] + [c_ia < 0] [x_ib > 0] = (|S|^T |T| - S^T T)_ab / 2`` for the
    counted rows' signs ``S`` and the inputs' signs ``T``: two matrix products of -1/0/1 matrices
    (exact in float32 up to 2^24 samples), added to the element's cells with one weighted count.

    Args:
        scaled: ``c``, ``[N, C_out]``.
        inputs: ``x``, ``[N, K]``.
        fine: The gradient axis.
        columns: The parameter-axis bin of each element, ``[C_out * K]`` (int32; NaN -> ``width``).
        width: Parameter-axis bins.
    """
    split = split_rows(scaled, inputs, fine)
    if split is None:
        return None
    rule, stride, size = split.rule, width + 1, (fine.bins + 1) * (width + 1)
    cells = columns.reshape(scaled.shape[1], inputs.shape[1])  # [C_out, K] int32
    per_row = split.counted.sum(0).double().unsqueeze(1).expand(cells.shape)  # [C_out, K]: counted rows of output a
    if rule.negative != rule.positive:
        negatives = _negative_products_per_element(scaled, inputs, split.counted)
        counts = torch.bincount((cells + rule.negative * stride).reshape(-1), weights=negatives.reshape(-1), minlength=size)
        counts += torch.bincount((cells + rule.positive * stride).reshape(-1), weights=(per_row - negatives).reshape(-1), minlength=size)
    else:
        counts = torch.bincount((cells + rule.positive * stride).reshape(-1), weights=per_row.reshape(-1), minlength=size)
    counts = counts.round_().long()
    for bins, outputs in formed_row_bins(scaled, inputs, split, fine):
        counts += torch.bincount(bins.mul_(stride).add_(cells.index_select(0, outputs)).reshape(-1), minlength=size)  # [m, K] cells
        del bins
    return counts
