"""Both gradient histograms from one bincount over a common refinement of their gradient axes.

When the 1-D axis and the 2-D gradient axis share a grid of fine bins
(:func:`histograms.common_refinement`), :func:`sample_pass.sample_statistics` bins each
gradient element once and derives both histograms from the joint (fine bin, parameter bin)
counts. These tests check the grid, that the joint path is taken, and that its counts equal the
two-pass counts and a brute-force numpy count, including out-of-range values, infinities, NaN
gradients and NaN parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import reference as ref
from test_instruments_exact import one_thread  # noqa: F401 (fixture: one intra-op thread)
from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments import histograms, row_blocks
from cockpit_cli.instruments.histograms import HistogramSpec, common_refinement
from cockpit_cli.instruments.sample_pass import DenseSamples, sample_statistics

BOTH = frozenset({r.HIST1D_COUNTS, r.HIST2D_COUNTS})
DEFAULTS = r.ReductionOptions()
SMALL = r.ReductionOptions(hist1d=HistogramSpec(8, -1.0, 1.0), hist2d=(HistogramSpec(4, -0.5, 0.5), HistogramSpec(3, -0.6, 0.6)))
# The 2-D gradient range wider than the 1-D one, and lows that meet only on a grid finer than either width.
# (Dyadic, so that the bin edges planted below are exact for either path.)
WIDER_2D = r.ReductionOptions(hist1d=HistogramSpec(8, -1.0, 1.0), hist2d=(HistogramSpec(8, -0.875, 1.125), HistogramSpec(4, -1.0, 1.0)))
COMMENSURATE = {"defaults": DEFAULTS, "small": SMALL, "wider_2d": WIDER_2D}


# --- the grid ----------------------------------------------------------------------------------


def test_refinement_of_the_default_axes() -> None:
    grid = common_refinement(DEFAULTS.hist1d, DEFAULTS.hist2d[0])
    assert grid is not None
    assert grid.fine == HistogramSpec(400, -2.0, 2.0)  # width 0.01
    assert grid.starts == (0, 100) and grid.factors == (4, 5)


@pytest.mark.parametrize(
    "a, b, fine, starts, factors",
    [
        (HistogramSpec(8, -1.0, 1.0), HistogramSpec(4, -0.5, 0.5), HistogramSpec(8, -1.0, 1.0), (0, 2), (1, 1)),
        (HistogramSpec(4, -0.5, 0.5), HistogramSpec(8, -1.0, 1.0), HistogramSpec(8, -1.0, 1.0), (2, 0), (1, 1)),
        (HistogramSpec(3, -1.0, 1.0), HistogramSpec(40, -1.0, 1.0), HistogramSpec(120, -1.0, 1.0), (0, 0), (40, 3)),
        (HistogramSpec(10, -1.0, 1.0), HistogramSpec(10, -0.95, 1.05), HistogramSpec(41, -1.0, 1.05), (0, 1), (4, 4)),
        (HistogramSpec(8, -1.0, 1.0), HistogramSpec(8, -0.875, 1.125), HistogramSpec(17, -1.0, 1.125), (0, 1), (2, 2)),
        (HistogramSpec(5, 0.0, 1.0), HistogramSpec(2, 2.0, 3.0), HistogramSpec(30, 0.0, 3.0), (0, 20), (2, 5)),  # disjoint
    ],
)
def test_refinement_of_commensurate_axes(a: HistogramSpec, b: HistogramSpec, fine: HistogramSpec, starts: tuple[int, int], factors: tuple[int, int]) -> None:
    grid = common_refinement(a, b)
    assert grid is not None
    assert (grid.fine, grid.starts, grid.factors) == (fine, starts, factors)
    for spec, start, factor in zip((a, b), grid.starts, grid.factors):  # every coarse edge is a fine edge
        fine_width = (fine.high - fine.low) / fine.bins
        assert spec.low == pytest.approx(fine.low + start * fine_width, abs=1e-12)
        assert spec.high == pytest.approx(fine.low + (start + spec.bins * factor) * fine_width, abs=1e-12)


@pytest.mark.parametrize(
    "a, b",
    [
        (HistogramSpec(100, -0.0372, 0.0372), HistogramSpec(40, -1.0, 1.0)),  # an adaptive 1-D range
        (HistogramSpec(10, -1.0, 1.0), HistogramSpec(10, -1.0 + math.sqrt(2) / 10, 1.0 + math.sqrt(2) / 10)),  # lows off the grid
        (HistogramSpec(10, -1.0, 1.0), HistogramSpec(10, -1.0, 1.0 + math.pi)),  # incommensurate widths
        (HistogramSpec(1000, -1.0, 1.0), HistogramSpec(999, -1.0, 1.0)),  # 999000 fine bins: too many
        (HistogramSpec(10, 1.0, 1.0), HistogramSpec(10, -1.0, 1.0)),  # empty range
        (HistogramSpec(10, -math.inf, 1.0), HistogramSpec(10, -1.0, 1.0)),
    ],
)
def test_incommensurate_axes_have_no_refinement(a: HistogramSpec, b: HistogramSpec) -> None:
    assert common_refinement(a, b) is None


def test_the_fine_bin_limit() -> None:
    a, b = HistogramSpec(32, -1.0, 1.0), HistogramSpec(31, -1.0, 1.0)  # 992 fine bins
    assert common_refinement(a, b).fine.bins == 992
    assert common_refinement(a, b, max_bins=991) is None


def test_coarsen_groups_runs_and_sends_outside_bins_to_the_edges() -> None:
    grid = common_refinement(HistogramSpec(2, -0.5, 0.5), HistogramSpec(4, -1.0, 1.0))  # fine: 4 bins of 0.5 over (-1, 1)
    assert (grid.fine.bins, grid.starts, grid.factors) == (4, (1, 0), (1, 1))
    counts = torch.tensor([[1, 10], [2, 20], [3, 30], [4, 40]])  # [fine bins, 2]
    assert grid.coarsen(counts, 0).tolist() == [[1 + 2, 10 + 20], [3 + 4, 30 + 40]]
    assert grid.coarsen(counts, 1).tolist() == counts.tolist()
    grid = common_refinement(HistogramSpec(2, -1.0, 1.0), HistogramSpec(2, -2.0, 2.0))  # fine: 4 bins of 1 over (-2, 2)
    assert grid.coarsen(torch.tensor([1, 2, 3, 4]), 0).tolist() == [1 + 2, 3 + 4]
    assert grid.coarsen(torch.tensor([1, 2, 3, 4]), 1).tolist() == [1 + 2, 3 + 4]


# --- the sample pass ---------------------------------------------------------------------------


def samples_and_theta(seed: int, n: int, d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gradients ``[n, d]`` and a parameter ``[d]`` spread over and beyond the ranges above, with
    bin edges and infinities in rows 0 and 1, NaN gradients and NaN parameters."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(n, d, generator=generator, dtype=torch.float64).mul_(1.2)
    theta = torch.randn(d, generator=generator, dtype=torch.float64).mul_(1.2)
    # Edges that float32 holds exactly (a value within a rounding error of an edge, such as
    # float32(-0.95), may fall on either side with either path).
    edges = torch.tensor([-2.0, -1.0, -0.875, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.125, 2.0, 3.0, math.inf, -math.inf], dtype=torch.float64)
    samples[0, : len(edges)] = edges
    samples[1, : len(edges)] = edges.flip(0)
    samples.view(-1)[torch.randperm(n * d, generator=generator)[: n * d // 50]] = math.nan
    theta[torch.randperm(d, generator=generator)[: d // 20]] = math.nan
    return samples.to(dtype), theta.to(dtype)


def two_pass(samples: Tensor, theta: Tensor, options: r.ReductionOptions) -> tuple[Tensor, Tensor]:
    """The histograms one at a time, each with its own bin index and bincount."""
    one = sample_statistics(DenseSamples(samples), None, frozenset({r.HIST1D_COUNTS}), theta, options).hist1d_counts
    two = sample_statistics(DenseSamples(samples), None, frozenset({r.HIST2D_COUNTS}), theta, options).hist2d_counts
    return one, two


def brute_force(samples: Tensor, theta: Tensor, options: r.ReductionOptions) -> tuple[Tensor, Tensor]:
    """numpy's counts, NaN (in either coordinate) dropped, values outside clamped."""
    one, (grad_axis, param_axis) = options.hist1d, options.hist2d
    hist1d = ref.grad_hist1d(samples.double(), one.bins, (one.low, one.high))
    bins, ranges = (grad_axis.bins, param_axis.bins), ((grad_axis.low, grad_axis.high), (param_axis.low, param_axis.high))
    return hist1d, ref.grad_hist2d([samples.double()], [theta.double()], bins, ranges)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("name", sorted(COMMENSURATE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_joint_counts_equal_the_two_pass_and_brute_force_counts(name: str, dtype: torch.dtype) -> None:
    options = COMMENSURATE[name]
    samples, theta = samples_and_theta(0, 64, 500, dtype)
    stats = sample_statistics(DenseSamples(samples), None, BOTH, theta, options)
    hist1d, hist2d = two_pass(samples, theta, options)
    assert stats.hist1d_counts.dtype == torch.int64 and stats.hist1d_counts.shape == (options.hist1d.bins,)
    assert stats.hist2d_counts.shape == (options.hist2d[0].bins, options.hist2d[1].bins)
    assert stats.hist1d_counts.tolist() == hist1d.tolist()
    assert stats.hist2d_counts.tolist() == hist2d.tolist()
    if dtype == torch.float64:
        # Rows 0 and 1 hold values on bin edges, and float32 values lie within its rounding
        # error of an edge more often: there bin_of (with either path) may differ from numpy's
        # float64 edges, so the brute-force count takes the other rows of float64 data.
        rest = sample_statistics(DenseSamples(samples[2:]), None, BOTH, theta, options)
        expected1d, expected2d = brute_force(samples[2:], theta, options)
        assert rest.hist1d_counts.tolist() == expected1d.tolist()
        assert rest.hist2d_counts.tolist() == expected2d.tolist()
    nan_gradients, nan_parameters = int(samples.isnan().sum()), int(theta.isnan().sum())
    assert nan_gradients > 0 and nan_parameters > 0
    assert int(stats.hist1d_counts.sum()) == samples.numel() - nan_gradients  # NaN parameters still counted in 1-D
    assert int(stats.hist2d_counts.sum()) == int((samples.isfinite() | samples.isinf()).logical_and(~theta.isnan()).sum())


def test_joint_counts_add_up_over_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    samples, theta = samples_and_theta(1, 40, 300, torch.float32)
    whole = sample_statistics(DenseSamples(samples), None, BOTH, theta, DEFAULTS)
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 7 * 300)  # 6 blocks, the last one short
    assert len(row_blocks.row_chunks(samples)) == 6
    blocks = sample_statistics(DenseSamples(samples), None, BOTH, theta, DEFAULTS)
    assert blocks.hist1d_counts.tolist() == whole.hist1d_counts.tolist()
    assert blocks.hist2d_counts.tolist() == whole.hist2d_counts.tolist()
    assert blocks.hist1d_counts.tolist() == two_pass(samples, theta, DEFAULTS)[0].tolist()


def test_default_1d_bins_are_exactly_those_of_bin_of() -> None:
    """With the defaults the fine scale is 4 times the 1-D scale from the same low, so the 1-D
    bins agree with ``bin_of`` for every value, near edges included; many float32 values check it."""
    generator = torch.Generator().manual_seed(2)
    samples = torch.randn(64, 16384, generator=generator).mul_(0.05)
    samples[:, :8192] = torch.linspace(-2.1, 2.1, 64 * 8192).reshape(64, 8192)  # dense over the whole range
    theta = torch.randn(16384, generator=generator)
    stats = sample_statistics(DenseSamples(samples), None, BOTH, theta, DEFAULTS)
    assert stats.hist1d_counts.tolist() == DEFAULTS.hist1d.count(samples).tolist()


def bincount_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of ``torch.bincount`` from now on (one entry per call)."""
    calls: list[int] = []
    bincount = torch.bincount

    def counting(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return bincount(*args, **kwargs)

    monkeypatch.setattr(torch, "bincount", counting)
    return calls


@pytest.mark.parametrize("name", sorted(COMMENSURATE))
def test_commensurate_axes_take_one_bincount_per_block(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    samples, theta = samples_and_theta(3, 16, 100, torch.float32)
    calls = bincount_calls(monkeypatch)
    sample_statistics(DenseSamples(samples), None, BOTH, theta, COMMENSURATE[name])
    assert len(calls) == len(row_blocks.row_chunks(samples)) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_incommensurate_axes_fall_back_to_two_bincounts(monkeypatch: pytest.MonkeyPatch) -> None:
    adaptive = r.ReductionOptions(hist1d=HistogramSpec(11, -0.37, 0.37), hist2d=(HistogramSpec(7, -0.3, 0.3), HistogramSpec(5, -1.0, 1.0)))
    assert common_refinement(adaptive.hist1d, adaptive.hist2d[0]) is None
    samples, theta = samples_and_theta(4, 16, 100, torch.float64)
    calls = bincount_calls(monkeypatch)
    stats = sample_statistics(DenseSamples(samples), None, BOTH, theta, adaptive)
    assert len(calls) == 2
    expected1d, expected2d = brute_force(samples, theta, adaptive)
    assert stats.hist1d_counts.tolist() == expected1d.tolist()
    assert stats.hist2d_counts.tolist() == expected2d.tolist()


def test_the_fallback_gives_the_same_counts_on_commensurate_axes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing the two-pass code on commensurate axes changes nothing (fixed data, no value near an edge)."""
    samples, theta = samples_and_theta(5, 32, 400, torch.float32)
    joint = sample_statistics(DenseSamples(samples), None, BOTH, theta, DEFAULTS)
    monkeypatch.setattr(histograms, "common_refinement", lambda a, b, max_bins=histograms.MAX_FINE_BINS: None)
    separate = sample_statistics(DenseSamples(samples), None, BOTH, theta, DEFAULTS)
    assert joint.hist1d_counts.tolist() == separate.hist1d_counts.tolist()
    assert joint.hist2d_counts.tolist() == separate.hist2d_counts.tolist()
