"""Whole-tensor sums of the per-layer diagnostics: the nonzero count is exact and counts like torch."""

from __future__ import annotations

import math

import pytest
import torch

from cockpit_cli.instruments.moments import COUNT_NONZERO_MOST, MOMENT_BLOCK, mean_and_std, nonzero_count, output_moments, wide_sums, zero_counts


def awkward(size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """ReLU-like values (about half exact zeros) with -0.0, NaN, infinities and tiny numbers
    scattered through every block."""
    values = torch.randn(size, generator=torch.Generator().manual_seed(seed)).clamp_(min=0).to(dtype)
    specials = torch.tensor([-0.0, math.nan, math.inf, -math.inf, torch.finfo(dtype).tiny / 4, -1e-30, 0.0], dtype=dtype)
    for start in range(0, size, max(size // 5, 1)):
        stop = min(start + len(specials), size)
        values[start:stop] = specials[: stop - start]
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [0, 1, 999, COUNT_NONZERO_MOST, COUNT_NONZERO_MOST + 1, 2 * MOMENT_BLOCK + 12345])
def test_the_nonzero_count_counts_as_torch_does(size: int, dtype: torch.dtype) -> None:
    """NaN and infinities count as nonzero, -0.0 as zero, on both sides of the size where the
    count changes method and over several blocks."""
    values = awkward(size, dtype)
    count = nonzero_count(values)
    assert count.dtype == torch.float64
    assert int(count) == int(torch.count_nonzero(values))
    assert zero_counts([values, values[: size // 2]]) == [size - int(torch.count_nonzero(values)), size // 2 - int(torch.count_nonzero(values[: size // 2]))]


def test_the_nonzero_count_is_exact_beyond_float32_integers() -> None:
    """2^24 + 3 ones: a float32 sum of all of them would round (to 2^24 + 4); block sums added in
    float64 do not."""
    size = (1 << 24) + 3
    assert int(nonzero_count(torch.ones(size))) == size


def test_output_moments_of_a_large_layer_output() -> None:
    """Sum, sum of squares and nonzeros of a [64, 32, 24, 24] output (1.2 M elements: two blocks)."""
    output = torch.randn(64, 32, 24, 24, generator=torch.Generator().manual_seed(1)).clamp_(min=0)
    total, squares, nonzeros = output_moments(output).tolist()
    wide = output.double()
    assert total == pytest.approx(float(wide.sum()), rel=1e-12)
    assert squares == pytest.approx(float((wide * wide).sum()), rel=1e-12)
    assert nonzeros == int(torch.count_nonzero(output))


def test_zero_counts_of_no_tensors_and_of_integers() -> None:
    assert zero_counts([]) == []
    integers = torch.arange(3 * COUNT_NONZERO_MOST) % 3  # a layer output need not be floating point
    assert zero_counts([integers, integers > 0]) == [COUNT_NONZERO_MOST] * 2


def test_mean_and_std_of_no_values_and_of_equal_values() -> None:
    """No values: 0 and 0. Three equal values, whose float64 sums leave a variance a rounding
    error below zero: a spread of exactly 0."""
    assert mean_and_std(0.0, 0.0, 0) == (0.0, 0.0)
    total, squares = wide_sums(torch.full((3,), 0.1, dtype=torch.float64))
    assert float(squares) / 3 - (float(total) / 3) ** 2 < 0
    mean, std = mean_and_std(float(total), float(squares), 3)
    assert mean == pytest.approx(0.1, rel=1e-15) and std == 0.0
