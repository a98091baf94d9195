"""Sums over all elements of a tensor, exact or in float64, a block at a time.

Activations, InputStats and LayerStats reduce whole tensors (layer outputs, the input batch,
gradients) to a few numbers at every tracked step. A float64 copy or a mask of a large tensor
would cost as much memory as the tensor, so the sums run over blocks of :data:`MOMENT_BLOCK`
elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

MOMENT_BLOCK = 1 << 20  # elements per block

# torch.count_nonzero runs at about a nanosecond an element up to 2^16 elements on the CPU, then
# ten times slower (a [128, 64, 28, 28] layer output: 29 ms); the arithmetic count below, at
# about 0.6 ns an element, is taken from this size on.
COUNT_NONZERO_MOST = 1 << 15


def output_moments(values: Tensor) -> Tensor:
    """Return ``[sum, sum of squares, nonzeros]`` of all elements of ``values`` (float64, ``[3]``)."""
    return torch.stack((*wide_sums(values), nonzero_count(values)))


def wide_sums(values: Tensor) -> tuple[Tensor, Tensor]:
    """Return the sum and the sum of squares of all elements of ``values`` in float64 (0-d each).

    The float64 sums run over blocks of :data:`MOMENT_BLOCK` elements, so no float64 copy of a
    large tensor is ever made.
    """
    flat = values.reshape(-1)
    if flat.numel() <= MOMENT_BLOCK:
        wide = flat.double()
        return wide.sum(), torch.dot(wide, wide)
    total = squares = None
    for block in flat.split(MOMENT_BLOCK):
        block = block.double()
        block_total, block_squares = block.sum(), torch.dot(block, block)
        total = block_total if total is None else total + block_total
        squares = block_squares if squares is None else squares + block_squares
    return total, squares


def nonzero_count(values: Tensor) -> Tensor:
    """Return how many elements of ``values`` are not zero, as a float64 0-d tensor, exactly as
    ``torch.count_nonzero`` counts them (NaN and infinities count, -0.0 does not).

    Small tensors (and integer or boolean ones) use ``torch.count_nonzero``. Larger floating-point
    ones count a block at a time with arithmetic, which runs several times faster than it on the
    CPU: ``|sign(x)|`` with NaN taken as 1 is 1 for every nonzero element and 0 for every zero,
    and a block's sum of at most :data:`MOMENT_BLOCK` (< 2^24) such numbers is exact in float32.
    """
    flat = values.reshape(-1)
    if flat.numel() <= COUNT_NONZERO_MOST or not flat.is_floating_point():
        return torch.count_nonzero(flat).double()
    counts = []
    for block in flat.split(MOMENT_BLOCK):
        ones = block.nan_to_num(nan=1.0).sign_().abs_()
        counts.append((ones if ones.dtype in (torch.float32, torch.float64) else ones.float()).sum())
    return torch.stack(counts).double().sum()


def zero_counts(tensors: list[Tensor]) -> list[int]:
    """Return the number of exactly-zero entries of each tensor (-0.0 counts as zero, NaN does not),
    all in one transfer."""
    if not tensors:
        return []
    nonzeros = torch.stack([nonzero_count(t) for t in tensors]).tolist()
    return [t.numel() - round(count) for t, count in zip(tensors, nonzeros)]


def mean_and_std(total: float, squares: float, count: float) -> tuple[float, float]:
    """Return the mean and the population standard deviation of ``count`` values from their
    float64 sum and sum of squares (0 and 0 for no values)."""
    count = max(count, 1.0)
    mean = total / count
    return mean, max(squares / count - mean * mean, 0.0) ** 0.5
