"""The histograms of a Linear layer's per-sample gradients, counted mostly from their factors.

:func:`outer_histogram.outer_histogram` counts the rows of the outer products ``c_ia * x_ib``
that lie in the bin or two around 0 from ``c``, the largest ``|x|`` and the signs of ``x``, and
forms and bins only the other rows. These tests check that its counts equal those of binning
every formed product with ``HistogramSpec.bin_of`` (to the element, NaN slot included), and
:func:`outer_histogram.outer_joint_histogram`'s joint counts (gradient bin, parameter bin) those
of the blocks' joint count, on data
with zero rows, signed zeros, subnormal, infinite and NaN values, in float32 and float64; that
it really skips most rows; that it declines where it cannot be exact or would be slower; and
that the engine's histograms with it still equal numpy's counts of autograd's per-sample
gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import reference as ref
from test_instruments_exact import make_batches, one_thread, quantities, train  # noqa: F401 (one_thread: fixture)
from cockpit_cli.instruments import outer_histogram as oh
from cockpit_cli.instruments import histograms, row_blocks
from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.allocations import peak_cpu_bytes
from cockpit_cli.instruments.factored_gradients import FactoredConv, FactoredLinear
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.sample_pass import DenseSamples, _joint_counts, sample_statistics

SPECS = [
    HistogramSpec(100, -2.0, 2.0),  # the default: 0 is the edge between bins 49 and 50
    HistogramSpec(11, -1.0, 1.0),  # 0 inside bin 5
    HistogramSpec(6, -3e-3, 3e-3),  # narrow bins: most rows formed
    HistogramSpec(8, -0.01, 0.03),  # 0 on an edge only up to rounding (not a grid the sign rule knows)
    HistogramSpec(4, 0.001, 0.002),  # 0 below the range: small values clamp into bin 0
    HistogramSpec(1, -1.0, 1.0),  # one bin
    HistogramSpec(10, -1e5, 1e5),  # wide bins: every finite row counted
    HistogramSpec(100, -0.3701, 0.3701),  # an adaptive range: symmetric, widths not exact in binary
    HistogramSpec(7, -0.5, 1.3),  # 0 inside a bin, off centre
]


def formed_counts(scaled: Tensor, inputs: Tensor, spec: HistogramSpec) -> Tensor:
    """Bin every product ``scaled[i, a] * inputs[i, b]`` (computed as the layer's blocks compute them)."""
    products = scaled.unsqueeze(2) * inputs.unsqueeze(1)  # [N, C_out, K]
    return torch.bincount(spec.bin_of(products).reshape(-1), minlength=spec.bins + 1)


def factors(seed: int, dtype: torch.dtype, n: int = 37, outputs: int = 11, width: int = 23) -> tuple[Tensor, Tensor]:
    """Factors with ReLU-like zeros, zero rows and magnitudes over several decades (mostly small)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, width, generator=generator, dtype=dtype) * torch.rand(n, 1, generator=generator, dtype=dtype) * 3
    inputs[inputs.abs() < 0.3] = 0.0
    scaled = torch.randn(n, outputs, generator=generator, dtype=dtype) * 10 ** (-4 * torch.rand(n, outputs, generator=generator, dtype=dtype)) * 0.05
    scaled[torch.rand(n, outputs, generator=generator) < 0.3] = 0.0
    return scaled, inputs


def oddities(scaled: Tensor, inputs: Tensor, kind: str) -> None:
    """Plant one kind of unusual value (in place)."""
    tiny = torch.finfo(inputs.dtype).smallest_normal
    if kind == "nan input":
        inputs[3, 4] = math.nan
    elif kind == "nan and inf":
        inputs[5, 1] = math.inf
        scaled[7, 2] = math.nan
        scaled[8, 3] = math.inf
    elif kind == "signed zeros":
        scaled[2, :] = -0.0
        inputs[2, 2] = -0.0
        inputs[9, :5] = -0.0
    elif kind == "subnormal input":
        inputs[6, :] = tiny / 8
        inputs[6, 0] = -tiny / 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "nan input", "nan and inf", "signed zeros", "subnormal input"])
@pytest.mark.parametrize("seed", [0, 1])
def test_counts_equal_those_of_every_formed_product(dtype: torch.dtype, kind: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oh, "MAX_FORMED_SHARE", 1.0)  # never decline for speed: compare every spec
    scaled, inputs = factors(seed, dtype)
    oddities(scaled, inputs, kind)
    for spec in SPECS:
        counts = oh.outer_histogram(scaled, inputs, spec)
        expected = formed_counts(scaled, inputs, spec)
        if counts is None:  # declined: only where a subnormal product could have the wrong sign
            assert kind == "subnormal input"
            continue
        assert counts.tolist() == expected.tolist(), spec


def test_small_rows_are_counted_without_being_formed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default bins, rows of products below 0.04 are counted from signs: only the few
    larger rows reach ``bin_of`` (besides the reaches themselves)."""
    scaled, inputs = factors(2, torch.float32, n=64, outputs=50, width=200)
    scaled[:5] *= 1000  # five samples with large rows
    spec = HistogramSpec(100, -2.0, 2.0)
    binned: list[int] = []
    bin_of = HistogramSpec.bin_of

    def counting(self: HistogramSpec, values: Tensor, consume: bool = False, dtype: torch.dtype = torch.int32) -> Tensor:
        binned.append(values.numel())
        return bin_of(self, values, consume, dtype)

    monkeypatch.setattr(HistogramSpec, "bin_of", counting)
    counts = oh.outer_histogram(scaled, inputs, spec)
    monkeypatch.setattr(HistogramSpec, "bin_of", bin_of)
    assert counts.tolist() == formed_counts(scaled, inputs, spec).tolist()
    products = scaled.numel() * inputs.shape[1]
    assert sum(binned) < 0.15 * products
    assert int(counts[49]) > 0 and int(counts[50]) > 0 and int(counts[:49].sum() + counts[51:].sum()) > 0  # both signs and formed rows


def test_declines_where_forming_is_cheaper_or_products_could_be_subnormal() -> None:
    scaled, inputs = factors(3, torch.float32)
    assert oh.outer_histogram(torch.randn(scaled.shape), inputs, HistogramSpec(100, -2.0, 2.0)) is None  # most rows span many bins
    inputs[0, 0] = torch.finfo(torch.float32).smallest_normal / 4
    assert oh.outer_histogram(scaled, inputs, HistogramSpec(100, -2.0, 2.0)) is None
    assert oh.outer_histogram(scaled, inputs.double(), HistogramSpec(100, -2.0, 2.0)) is None  # mixed dtypes
    inputs[1, 1] = math.nan  # a NaN elsewhere must not hide the subnormal product
    assert oh.outer_histogram(scaled, inputs, HistogramSpec(100, -2.0, 2.0)) is None
    scaled[2, 2] = math.nan
    assert oh.outer_histogram(scaled, inputs, HistogramSpec(100, -2.0, 2.0)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sign_rule_limit_is_the_last_reach_that_keeps_its_bins(dtype: torch.dtype, spec: HistogramSpec) -> None:
    rule = oh.sign_rule(spec.bins, spec.low, spec.high, dtype)
    assert rule is not None
    limit = torch.tensor([rule.limit], dtype=dtype)
    beyond = torch.nextafter(limit, torch.tensor([math.inf], dtype=dtype))
    tiny = torch.tensor([rule.tiny], dtype=dtype)
    for value, expected in ((tiny, rule.positive), (limit, rule.positive), (-tiny, rule.negative), (-limit, rule.negative)):
        assert int(spec.bin_of(value)) == expected
    assert spec.bin_of(torch.tensor([0.0, -0.0], dtype=dtype)).tolist() == [rule.positive] * 2
    if rule.limit < torch.finfo(dtype).max:
        assert int(spec.bin_of(beyond)) != rule.positive or int(spec.bin_of(-beyond)) != rule.negative
    guess = oh._limit_guess(spec)  # the search starts from it: within a few roundings of the limit
    if rule.limit < torch.finfo(dtype).max and rule.limit > 1e-6:
        assert abs(rule.limit - guess) <= 64 * torch.finfo(dtype).eps * guess
    zero = spec.zero_offset
    if zero is not None and 0 < zero < spec.bins:  # 0 is an edge: the sign decides
        assert (rule.negative, rule.positive) == (zero - 1, zero)
    else:
        assert rule.negative == rule.positive


def test_no_sign_rule_where_zero_and_the_smallest_normal_number_part() -> None:
    """In a range of width near the smallest normal number, 0 and the smallest positive normal
    number fall into different bins: the rule's positive bin cannot hold the exact zeros, and
    there is no rule."""
    spec = HistogramSpec(3, -1e-38, 2e-38)
    tiny = torch.finfo(torch.float32).tiny
    zero_bin, tiny_bin = spec.bin_of(torch.tensor([0.0, tiny], dtype=torch.float32)).tolist()
    assert zero_bin != tiny_bin
    assert oh.sign_rule(spec.bins, spec.low, spec.high, torch.float32) is None


def test_bins_are_exact_in_sign_at_a_zero_edge() -> None:
    """Where 0 is an edge, a negative value however small is below it (the rule's premise)."""
    assert HistogramSpec(100, -2.0, 2.0).zero_offset == 50
    assert HistogramSpec(8, -1.0, 3.0).zero_offset == 2
    assert HistogramSpec(100, -0.37, 0.37).zero_offset == 50  # any symmetric range with an even number of bins
    assert HistogramSpec(11, -1.0, 1.0).zero_offset is None
    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        values = torch.tensor([-1e-30, -tiny, -0.0, 0.0, tiny, 1e-30], dtype=dtype)
        assert HistogramSpec(4, -2.0, 2.0).bin_of(values).tolist() == [1, 1, 2, 2, 2, 2]


def test_factored_linear_counts_its_rows_and_convolutions_and_regularized_layers_do_not() -> None:
    scaled, inputs = factors(4, torch.float32)
    n = scaled.shape[0]
    source = FactoredLinear(inputs, scaled / n, torch.Size([scaled.shape[1], inputs.shape[1]]))
    spec = HistogramSpec(100, -2.0, 2.0)
    formed = torch.cat(list(source.blocks()))
    assert source.histogram(spec).tolist() == torch.bincount(spec.bin_of(formed).reshape(-1), minlength=101).tolist()
    assert source.regularized(torch.randn(scaled.shape[1], inputs.shape[1]), 0.1).histogram(spec) is None
    conv = nn.Conv2d(2, 3, 3)
    images = torch.randn(4, 2, 5, 5)
    assert FactoredConv(conv, torch.randn(4, 3, 3, 3), images).histogram(spec) is None


@pytest.mark.parametrize("bins", [10, 11])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_engine_histograms_with_wide_bins_equal_numpy_counts(bins: int, loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide bins put every row of the MLP's Linear layers beside 0 (even bins: split by sign, odd:
    one bin); the counts, whole and per parameter, are numpy's of autograd's per-sample gradients."""
    calls: list[tuple[Tensor | None, bool]] = []
    histogram = oh.outer_histogram

    def spied(scaled: Tensor, inputs: Tensor, spec: HistogramSpec) -> Tensor | None:
        rule = oh.sign_rule(spec.bins, spec.low, spec.high, scaled.dtype)
        every_row_counted = bool((scaled.abs() * inputs.abs().amax(1, keepdim=True) <= rule.limit).all())
        calls.append((histogram(scaled, inputs, spec), every_row_counted))
        return calls[-1][0]

    monkeypatch.setattr("cockpit_cli.instruments.factored_gradients.outer_histogram", spied)
    hist_range = (-1000.0, 1000.0)
    model = ref.mlp(0)
    batches = make_batches("mlp", loss, 0, 2)
    run = train(model, batches, quantities(("GradHist1d",), GradHist1d={"bins": bins, "range": hist_range}))
    assert len(calls) == 6  # three Linear weights, two steps
    assert all(counts is not None and every_row_counted for counts, every_row_counted in calls)
    for step in range(2):
        theta_model = run.reference_model(step)
        batch = batches[step]
        grads = ref.per_sample_gradients(theta_model, batch.per_sample_loss_fn, batch.inputs, batch.targets)
        record = run.records[step]["GradHist1d"]
        assert record["counts"] == ref.grad_hist1d(grads, bins, hist_range).tolist()
        assert record["per_parameter"] == [ref.grad_hist1d(g.reshape(g.shape[0], -1), bins, hist_range).tolist() for g in grads]


FINE_SPECS = [HistogramSpec(400, -2.0, 2.0), HistogramSpec(11, -1.0, 1.0), HistogramSpec(8, -0.875, 1.125), HistogramSpec(6, -3e-3, 3e-3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "nan input", "nan and inf", "signed zeros"])
def test_joint_counts_equal_those_of_every_formed_product(dtype: torch.dtype, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oh, "MAX_FORMED_SHARE", 1.0)
    scaled, inputs = factors(5, dtype)
    oddities(scaled, inputs, kind)
    width = 5
    theta = torch.randn(scaled.shape[1] * inputs.shape[1], dtype=dtype)
    theta[::17] = math.nan
    columns = HistogramSpec(width, -1.0, 1.0).bin_of(theta)  # NaN -> width
    formed = (scaled.unsqueeze(2) * inputs.unsqueeze(1)).reshape(scaled.shape[0], -1)
    for fine in FINE_SPECS:
        counts = oh.outer_joint_histogram(scaled, inputs, fine, columns, width)
        assert counts is not None
        assert counts.tolist() == _joint_counts(fine, formed, columns, width).tolist(), fine


def test_engine_joint_histograms_from_factors_equal_numpy_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commensurate wide ranges (one fine grid) with most rows beside 0: both histograms, whole
    and per parameter, equal numpy's counts of autograd's per-sample gradients, and every Linear
    weight's joint counts came from its factors."""
    calls: list[Tensor | None] = []
    joint = oh.outer_joint_histogram

    def spied(*args: object) -> Tensor | None:
        calls.append(joint(*args))
        return calls[-1]

    monkeypatch.setattr("cockpit_cli.instruments.factored_gradients.outer_joint_histogram", spied)
    model = ref.mlp(1)
    batches = make_batches("mlp", "ce", 1, 2)
    options = {"GradHist1d": {"bins": 10, "range": (-100.0, 100.0)}, "GradHist2d": {"bins": (20, 4), "range": ((-100.0, 100.0), (-0.5, 0.5))}}
    run = train(model, batches, quantities(("GradHist1d", "GradHist2d"), **options))
    assert len(calls) == 6 and all(counts is not None for counts in calls)
    for step in range(2):
        batch = batches[step]
        theta_model = run.reference_model(step)
        grads = ref.per_sample_gradients(theta_model, batch.per_sample_loss_fn, batch.inputs, batch.targets)
        theta = [p.detach() for p in ref.trainable(theta_model)]
        hist1d, hist2d = run.records[step]["GradHist1d"], run.records[step]["GradHist2d"]
        assert hist1d["counts"] == ref.grad_hist1d(grads, 10, (-100.0, 100.0)).tolist()
        assert hist2d["counts"] == ref.grad_hist2d(grads, theta, (20, 4), ((-100.0, 100.0), (-0.5, 0.5))).tolist()
        assert hist2d["per_parameter"] == [h.tolist() for h in ref.grad_hist2d_per_param(grads, theta, (20, 4), ((-100.0, 100.0), (-0.5, 0.5)))]


@pytest.mark.parametrize("spec", [HistogramSpec(100, -2.0, 2.0), HistogramSpec(7, -0.3, 1.1)], ids=["zero edge", "no zero edge"])
def test_consuming_bin_of_gives_the_same_bins(spec: HistogramSpec) -> None:
    values = torch.cat([torch.randn(997) * 3, torch.tensor([0.0, -0.0, 1e-30, -1e-30, math.inf, -math.inf, math.nan])])
    expected = spec.bin_of(values)
    scratch = values.clone()
    assert torch.equal(spec.bin_of(scratch, consume=True), expected)
    assert torch.equal(spec.bin_of(values), expected)  # values left alone without consume


@pytest.mark.parametrize(("bins", "dtype"), [(100, torch.int8), (127, torch.int8), (128, torch.int16), (32767, torch.int16), (32768, torch.int32)])
def test_counts_take_the_narrowest_bin_index_that_holds_nan_s_slot(bins: int, dtype: torch.dtype) -> None:
    """``counts_of`` bins into the narrowest integers that hold index ``bins`` (NaN's slot), with
    the counts of int32 bins: clamped ends, both zeros, tiny values of either sign and NaN."""
    spec = HistogramSpec(bins, -2.0, 2.0)
    assert spec.narrow_index == dtype
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, math.inf, -math.inf, 5.0, -5.0, math.nan, math.nan])
    values = torch.cat([torch.randn(3990) * 1.5, special]).reshape(40, 100).t()  # strided
    expected = torch.bincount(spec.bin_of(values).reshape(-1), minlength=bins + 1)
    assert int(expected[bins]) == 2 and int(expected[0]) > 0 and int(expected[bins - 1]) > 0
    assert torch.equal(spec.counts_of(values), expected)
    scratch = values.clone()
    assert torch.equal(spec.counts_of(scratch, consume=True), expected)
    assert torch.equal(spec.count(values), expected[:bins])


def test_bin_indices_beyond_int32_are_int64() -> None:
    assert HistogramSpec(2**31, -2.0, 2.0).narrow_index == torch.int64  # the widest, for any number of bins


def test_formed_rows_hold_one_block_of_products_and_its_bins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of products is formed in its gathered inputs, binned in place into int8 bins (a
    quarter of the block), and released before the next is formed, besides temporaries of the
    factors' size: 1.33 blocks here (2.08 with int32 bins; three blocks while it held the last
    block's products, the gathered inputs and their products)."""
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 1 << 16)
    scaled, inputs = factors(3, torch.float32, n=8, outputs=256, width=1024)
    scaled[:, ::2] = 1e3 * scaled[:, ::2].sign()  # 810 of the 2048 rows are formed, in 13 blocks of 64 rows
    spec = HistogramSpec(100, -2.0, 2.0)
    block_bytes = (1 << 16) * 4
    assert oh.outer_histogram(scaled, inputs, spec).tolist() == formed_counts(scaled, inputs, spec).tolist()
    peak = peak_cpu_bytes(lambda: oh.outer_histogram(scaled, inputs, spec))
    assert peak < 1.5 * block_bytes, f"{peak / block_bytes:.2f} blocks"


@pytest.mark.parametrize("joint", [False, True], ids=["1-D", "1-D and 2-D"])
def test_blocks_formed_for_the_sample_pass_are_binned_in_place(joint: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the rows are too large to count from their signs, the sample pass forms blocks of
    products from the factors. The histograms read a block last and bin it in place, and the
    block is released before the next is formed, so one block and its bins are held (int8 bins
    for the 1-D counts alone: 1.3 blocks, where it held 3.0; int32 for the joint ones, with
    the joint counts of the block and of the blocks before it, two thirds of a block each, and
    the parameter's columns: 3.5 blocks, where it held 4.5). The counts are those of the formed
    gradients binned without touching them."""
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 1 << 16)
    torch.manual_seed(0)
    n, out_features, in_features = 12, 16, 1024  # four samples per block: 64 Ki products, 256 KiB
    inputs, grad_outputs = torch.randn(n, in_features), torch.randn(n, out_features) * 10
    theta = torch.randn(out_features * in_features)
    wanted = frozenset({r.HIST1D_COUNTS, r.HIST2D_COUNTS} if joint else {r.HIST1D_COUNTS})
    options = r.ReductionOptions()

    def source() -> FactoredLinear:
        return FactoredLinear(inputs, grad_outputs, torch.Size([out_features, in_features]))

    assert oh.split_rows(grad_outputs * n, inputs, options.hist1d) is None  # too many large rows: blocks are formed
    formed = (grad_outputs * n).unsqueeze(2) * inputs.unsqueeze(1)  # [N, out, in], as the blocks form them
    expected = sample_statistics(DenseSamples(formed), None, wanted, theta, options)
    found = sample_statistics(source(), None, wanted, theta, options)
    assert found.hist1d_counts.tolist() == expected.hist1d_counts.tolist()
    assert found.hist1d_counts.tolist() == options.hist1d.count(formed.reshape(n, -1)).tolist()
    if joint:
        assert found.hist2d_counts.tolist() == expected.hist2d_counts.tolist()
    block_bytes = (1 << 16) * 4
    peak = peak_cpu_bytes(lambda: sample_statistics(source(), None, wanted, theta, options))
    most = 4.0 if joint else 1.5
    assert peak < most * block_bytes, f"{peak / block_bytes:.2f} blocks"


def test_binning_a_formed_block_in_place_leaves_the_other_statistics_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """1-D and 2-D axes without a common refinement bin a block each on their own, the 2-D one
    last and in place, and the largest magnitude is read before: a factored source gives the
    statistics of the same gradients held whole, with NaN and infinities among the factors."""
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 1 << 11)
    torch.manual_seed(1)
    n, out_features, in_features = 6, 8, 64  # D = 512: blocks of 4 and 2 samples
    inputs, grad_outputs = torch.randn(n, in_features), torch.randn(n, out_features)
    inputs[1, 3], inputs[4, 0], grad_outputs[2, 5] = math.nan, math.inf, -math.inf
    options = r.ReductionOptions(hist1d=HistogramSpec(7, -0.31, 1.1), hist2d=(HistogramSpec(9, -2.0, 2.5), HistogramSpec(5, -1.0, 1.0)))
    assert histograms.common_refinement(options.hist1d, options.hist2d[0]) is None
    theta = torch.randn(out_features * in_features)
    theta[7] = math.nan
    wanted = frozenset({r.HIST1D_COUNTS, r.HIST2D_COUNTS, r.LARGEST})
    formed = (grad_outputs * n).unsqueeze(2) * inputs.unsqueeze(1)  # [N, out, in], as the blocks form them
    expected = sample_statistics(DenseSamples(formed), None, wanted, theta, options)
    found = sample_statistics(FactoredLinear(inputs, grad_outputs, torch.Size([out_features, in_features])), None, wanted, theta, options)
    assert found.hist1d_counts.tolist() == expected.hist1d_counts.tolist() == options.hist1d.count(formed.reshape(n, -1)).tolist()
    assert found.hist2d_counts.tolist() == expected.hist2d_counts.tolist()
    assert math.isnan(found.largest.item()) and math.isnan(expected.largest.item())
    inputs[1, 3] = 1.0  # without NaN the largest magnitude is the infinity, which bins would not hold
    found = sample_statistics(FactoredLinear(inputs, grad_outputs, torch.Size([out_features, in_features])), None, wanted, theta, options)
    assert found.largest.item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_smallest_nonzero_magnitude_from_bit_patterns(dtype: torch.dtype) -> None:
    """The smallest positive entry, NaN left out, inf where there is none: against filling the rest with inf."""
    info = torch.finfo(dtype)
    tiny_subnormal = torch.tensor(info.smallest_normal, dtype=dtype) / 4
    cases = [
        torch.tensor([0.0, 3.0, 0.5, math.nan, math.inf], dtype=dtype),
        torch.tensor([[0.0, info.max], [math.inf, 7.0]], dtype=dtype),
        torch.cat([torch.tensor([0.0, 1.0, math.nan], dtype=dtype), tiny_subnormal.reshape(1)]),
        torch.tensor([0.0, 0.0], dtype=dtype),
        torch.tensor([math.nan, 0.0], dtype=dtype),
        torch.tensor([math.inf, 0.0], dtype=dtype),
        torch.rand(37, 11, dtype=torch.float64).to(dtype).relu_(),
        torch.rand(64, dtype=torch.float64).sub(0.5).to(dtype).relu_()[::3],  # strided, half of it 0
    ]
    for magnitudes in cases:
        expected = magnitudes.masked_fill(~(magnitudes > 0), math.inf).amin()
        found = oh._smallest_nonzero(magnitudes)
        assert found.dtype == dtype and found.shape == ()
        assert found.item() == expected.item(), (magnitudes, found, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counts_of_half_precision_factors_are_exact_beyond_their_integers(dtype: torch.dtype) -> None:
    """bfloat16 holds the integers only to 256 and float16 to 2048: the rows' counts are kept
    in float32, so 3001 counted rows per sample and 600 per output still count exactly."""
    generator = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (600, 3001), generator=generator) * 2 - 1
    scaled = (signs * (0.005 + 0.005 * torch.rand(600, 3001, generator=generator))).to(dtype)  # no product below the smallest normal
    inputs = ((torch.randint(0, 2, (600, 5), generator=generator) * 2 - 1) * (0.5 + 1.5 * torch.rand(600, 5, generator=generator))).to(dtype)
    spec = HistogramSpec(100, -2.0, 2.0)
    assert oh.split_rows(scaled, inputs, spec).formed == 0
    assert oh.outer_histogram(scaled, inputs, spec).tolist() == formed_counts(scaled, inputs, spec).tolist()
    width = 4
    columns = torch.randint(0, width + 1, (3001 * 5,), generator=generator, dtype=torch.int32)
    formed = (scaled.unsqueeze(2) * inputs.unsqueeze(1)).reshape(600, -1)
    assert oh.outer_joint_histogram(scaled, inputs, spec, columns, width).tolist() == _joint_counts(spec, formed, columns, width).tolist()
