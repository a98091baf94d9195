"""The engine with per-sample gradients formed a few samples at a time, against the brute-force references.

The reference models are so small that every layer normally fits in one block of samples. Here
``CHUNK_ELEMENTS`` is lowered so that Linear and Conv2d weights are formed in blocks of 1 to 5 of
the N = 8 samples, most of which do not divide N, with and without weight decay.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments import row_blocks
from cockpit_cli.instruments.accumulator import Accumulator
from cockpit_cli.instruments.factored_gradients import FactoredLinear, FactoredSamples
from cockpit_cli.instruments import Schedule
from cockpit_cli.instruments.backend import GradientCapture
import reference as ref
import reference_curvature as curv
from test_instruments_alpha import reference_alpha
from test_instruments_curvature import DIAGONAL, reference_values
from test_instruments_exact import (  # noqa: F401 (fixture)
    BUILDERS, CASES, DECAY, FIRST_ORDER, N, assert_close, check_first_order, histogram_options, make_batches, one_thread, quantities, train,
)  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

# Elements per block -> samples per block of each weight. mlp: Linear(6, 5), (5, 4), (4, 3) have
# D = 30, 20, 12; cnn: Conv2d(2, 3, 3) has D = 54 plus 18 x 16 patch elements per sample, Linear(12, 3) D = 36.
CHUNKS = {"mlp": (40, 100), "cnn": (250, 1100)}


@pytest.fixture
def block_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[int]]:
    """Record the number of samples of every block the factored sources form, by class."""
    sizes: dict[str, set[int]] = {}
    original = FactoredSamples.blocks

    def recording(self: FactoredSamples) -> Iterator[Tensor]:
        for block in original(self):
            sizes.setdefault(type(self).__name__, set()).add(block.shape[0])
            yield block

    monkeypatch.setattr(FactoredSamples, "blocks", recording)
    return sizes


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("kind, loss", CASES)
def test_first_order_quantities_in_blocks_of_samples(
    kind: str, loss: str, weight_decay: float, monkeypatch: pytest.MonkeyPatch, block_sizes: dict[str, set[int]]
) -> None:
    for chunk in CHUNKS[kind]:
        monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", chunk)
        block_sizes.clear()
        model = BUILDERS[kind](1)
        batches = make_batches(kind, loss, 1, 2)
        run = train(model, batches, quantities(FIRST_ORDER, **histogram_options(model, batches[0], weight_decay)), weight_decay=weight_decay)
        assert run.instruments.unavailable == {}
        for step in range(2):
            check_first_order(run, step, weight_decay=weight_decay)
        formed = set().union(*block_sizes.values())
        assert any(N % size for size in formed), f"every block size {formed} divides N"
        assert min(formed) < N
    assert set(block_sizes) == ({"FactoredLinear"} if kind == "mlp" else {"FactoredLinear", "FactoredConv"})


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_curvature_quantities_in_blocks_of_samples(kind: str, weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", CHUNKS[kind][0])
    run = train(BUILDERS[kind](0), make_batches(kind, "ce", 0, 2), quantities(DIAGONAL + ("MeanGSNR",)), weight_decay=weight_decay)
    for step in range(2):
        expected = reference_values(run, step, "hessian", weight_decay)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(run.records[step]["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


def test_adaptive_range_and_projections_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest magnitude (adaptive histogram) and the projections ``G[i] . u`` of a block-wise pass."""
    from cockpit_cli.instruments.sample_pass import DenseSamples, reduce_layer

    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(5)
    inputs, delta = torch.randn(N, 6, generator=gen, dtype=torch.float64), torch.randn(N, 5, generator=gen, dtype=torch.float64)
    theta, direction = torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 6, generator=gen, dtype=torch.float64)
    dense = (N * delta[:, :, None] * inputs[:, None, :] + DECAY * theta).reshape(N, -1)
    requested = frozenset({r.ABS_MAX, r.PROJECTIONS, r.SAMPLE_DOTS, r.SAMPLE_SQ_NORMS, r.GSNR_SUM, r.EB_SUM})
    options = r.ReductionOptions(direction=[direction])
    results = []
    for source in (DenseSamples(dense.clone()), FactoredLinear(inputs, delta, theta.shape).regularized(theta, DECAY)):
        acc = Accumulator(1)
        reduce_layer(0, source, theta, None, requested, acc, options)
        results.append(acc.totals)
    assert_close(float(results[1][r.ABS_MAX]), float(dense.abs().max()))
    assert_close(results[1][r.PROJECTIONS].tolist(), (dense @ direction.reshape(-1)).tolist())
    for name in requested:
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_alpha_completes_with_products_from_the_factors(kind: str, weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracked every other step: the steps in between need only the projections ``G[i] . d``,
    which come from the layers' factors in the backward pass, not from a forward-mode pass."""
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", CHUNKS[kind][0])
    forward_mode = []
    slopes = GradientCapture.start_slopes
    monkeypatch.setattr(GradientCapture, "start_slopes", lambda self, *args: (lambda take: lambda d: forward_mode.append(d) or take(d))(slopes(self, *args)))  # counts the passes made
    run = train(BUILDERS[kind](2), make_batches(kind, "ce", 2, 4), quantities(("Alpha",), Schedule(every=2)), weight_decay=weight_decay)
    assert run.instruments.capture.factored and forward_mode == []
    assert sorted(run.records) == [0, 2]
    for step in (0, 2):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, weight_decay), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("conv", ["grouped", "same_padding", "same_padding_1d", "valid_padding"])
def test_other_convolutions(conv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grouped convolution forms dense blocks by BackPACK's rule, which reads only the shape of
    the layer output that the engine keeps in place of the output itself; ``padding="same"``
    (which BackPACK's rule gets wrong) and ``padding="valid"`` are unfolded with their padding as numbers."""
    from torch import nn

    from cockpit_cli.instruments.factored_batch_grad import factored_layer

    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 100)
    torch.manual_seed(3)
    batches = make_batches("cnn", "ce", 3, 2)
    if conv == "grouped":
        layer, outputs = nn.Conv2d(2, 4, 3, groups=2), 4 * 4 * 4
    elif conv == "same_padding":
        layer, outputs = nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(2, 1)), 3 * 6 * 6
    elif conv == "valid_padding":
        layer, outputs = nn.Conv2d(2, 3, 3, padding="valid"), 3 * 4 * 4
    else:
        layer, outputs = nn.Conv1d(2, 3, 3, padding="same"), 3 * 6 * 6
        batches = [batch._replace(inputs=batch.inputs.reshape(len(batch.inputs), 2, -1)) for batch in batches]
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(outputs, 3)).double()
    assert factored_layer(layer) == (conv != "grouped")
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "GradHist1d")
    run = train(model, batches, quantities(names, **histogram_options(model, batches[0], DECAY)), weight_decay=DECAY)
    assert run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, weight_decay=DECAY, names=names)


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_convolutions_padding_with_their_own_values_get_exact_values_from_their_hooks(mode: str) -> None:
    """BackPACK's convolution rules compute as if the layer padded with zeros (such a layer had its
    per-sample gradients from torch.func and no curvature): the patches are now those of the input
    padded with its own values, and a curvature factor passes back through the layer's own
    computation. A grouped one keeps torch.func, without curvature."""
    from torch import nn

    from cockpit_cli.instruments.factored_batch_grad import factored_layer
    from cockpit_cli.instruments.support import check_support

    torch.manual_seed(3)
    batches = make_batches("cnn", "ce", 3, 2)
    layer = nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode=mode)
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(3, 2, 2, padding=1, padding_mode=mode), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 7 * 9, 3)).double()
    assert factored_layer(layer)
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "GradHist1d", "Alpha")
    for curvature in ("hessian", "ggn"):
        run = train(copy.deepcopy(model), batches + make_batches("cnn", "ce", 4, 1), quantities(names + ("HessTrace", "TICDiag"), **histogram_options(model, batches[0], DECAY)), weight_decay=DECAY, curvature=curvature)
        assert (run.instruments.support.per_sample, run.instruments.unavailable) == ("backpack", {})
        for step in range(2):
            check_first_order(run, step, weight_decay=DECAY, names=names[:-1])
            assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, DECAY), rel=1e-6, abs=1e-8)
            inputs, targets, loss_fn, _ = run.batches[step]
            reference = run.reference_model(step)
            diagonal = (curv.hessian_diagonal if curvature == "hessian" else curv.ggn_diagonal)(reference, loss_fn, inputs, targets, ref.weights(reference), DECAY)
            assert run.records[step]["HessTrace"] == pytest.approx(curv.hess_trace(diagonal), rel=1e-9, abs=1e-12)
    # Alpha every other step: its second points alone take each layer's products with the update
    alpha = train(copy.deepcopy(model), make_batches("cnn", "ce", 5, 4), quantities(("Alpha",), Schedule(every=2)), weight_decay=DECAY)
    assert [alpha.records[step]["Alpha"] for step in (0, 2)] == [pytest.approx(reference_alpha(alpha, step, DECAY), rel=1e-6, abs=1e-8) for step in (0, 2)]
    grouped = check_support(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), nn.CrossEntropyLoss())
    assert (grouped.per_sample, grouped.curvature) == ("functorch", False)
    assert grouped.curvature_reason == f"layer '0' (Conv2d) pads in '{mode}' mode, which BackPACK's curvature rules compute as zero padding"


def float32_source(spread: float, weight_decay: float) -> tuple[FactoredLinear, Tensor]:
    """A float32 Linear source whose per-sample gradients deviate from a common one by about
    ``spread`` (relative), and the float64 sum ``sum_i ||G[i] - g||^2`` of its exact products."""
    gen = torch.Generator().manual_seed(7)
    n, outputs, width = 64, 30, 40
    delta = (torch.randn(1, outputs, generator=gen) + spread * torch.randn(n, outputs, generator=gen)) / n
    inputs = torch.randn(1, width, generator=gen) + spread * torch.randn(n, width, generator=gen)
    theta = torch.randn(outputs, width, generator=gen)
    source = FactoredLinear(inputs, delta, theta.shape).regularized(theta, weight_decay)
    g = source.mean()
    exact = n * delta.double()[:, :, None] * inputs.double()[:, None, :] + weight_decay * theta.double()  # float32 products are exact in float64
    return source, ((exact.reshape(n, -1) - g.double()) ** 2).sum()


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("spread", [1.0, 0.1, 0.01, 0.001])
def test_centered_sum_of_float32_factors_stays_accurate_when_gradients_nearly_agree(spread: float, weight_decay: float) -> None:
    source, expected = float32_source(spread, weight_decay)
    centered = source.centered_sum(source.mean())
    assert float(abs(centered - expected) / expected) < 2e-6


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("spread", [1.0, 0.001])
def test_centered_sum_with_its_float64_numbers_in_blocks_of_rows(spread: float, weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 rows of ``C = lambda theta - g`` (30 of them) taken 4 at a time, and the
    squared norms of the factors 4 or 5 samples at a time: blocks that do not divide the rows
    give the same sums, about the layer's own mean and about another."""
    from cockpit_cli.instruments import factored_gradients

    monkeypatch.setattr(factored_gradients, "WIDE_BLOCK_ELEMENTS", 160)  # 4 rows of 40 inputs, 5 of 30 outputs
    source, expected = float32_source(spread, weight_decay)
    own = source.mean()
    assert float(abs(source.centered_sum(own) - expected) / expected) < 2e-6
    other = own * 1.1 + 1e-3
    formed = torch.cat(list(source.blocks())).double()  # [N, D]
    expected = ((formed - other.double()) ** 2).sum()
    assert float(abs(source.centered_sum(other) - expected) / expected) < 2e-6


def test_centered_sum_about_its_own_mean_skips_a_product_and_about_another_takes_it() -> None:
    """About the layer's own data gradient the crossed sum is -||g||^2, the value the product
    would give to the bit; about another mean (as data-parallel processes combine it) it is not."""
    source, _ = float32_source(1.0, 0.0)
    own = source.mean()
    assert torch.equal(source.centered_sum(own), source.centered_sum(own.clone()))
    other = own * 1.1 + 1e-3
    formed = torch.cat(list(source.blocks())).double()  # [N, D]
    expected = ((formed - other.double()) ** 2).sum()
    assert float(abs(source.centered_sum(other) - expected) / expected) < 2e-6


def test_centered_sum_sums_over_samples_where_its_terms_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample gradients within 0.1% of each other: the terms cancel by a factor of about 4e5,
    where the float32 data gradient's rounding would show; summed over the samples, it does not."""
    from cockpit_cli.instruments import factored_gradients

    source, expected = float32_source(0.001, 0.0)
    assert float(abs(source.centered_sum(source.mean()) - expected) / expected) < 1e-9
    monkeypatch.setattr(factored_gradients, "CANCELLATION_LIMIT", float("inf"))
    assert float(abs(source.centered_sum(source.mean()) - expected) / expected) > 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_moment_from_the_factors_equals_that_of_formed_gradients(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    inputs, delta = torch.randn(N, 6, generator=gen, dtype=dtype), torch.randn(N, 5, generator=gen, dtype=dtype)
    source = FactoredLinear(inputs, delta, torch.Size([5, 6]))
    formed = torch.cat(list(source.blocks()))
    assert torch.allclose(source.second_moment(), formed.square().sum(0), rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    assert source.regularized(torch.randn(5, 6, generator=gen, dtype=dtype), DECAY).second_moment() is None


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_linear_layers_form_no_blocks_for_the_second_moment(kind: str, block_sizes: dict[str, set[int]]) -> None:
    """MeanGSNR needs sum_i G[i]^2 per coordinate: Linear weights give it from their factors
    (without an L2 term), convolutions from blocks; the values match the references."""
    model = BUILDERS[kind](2)
    run = train(model, make_batches(kind, "ce", 2, 2), quantities(("MeanGSNR", "NormTest")))
    for step in range(2):
        check_first_order(run, step, names=("MeanGSNR", "NormTest"))
    assert set(block_sizes) == (set() if kind == "mlp" else {"FactoredConv"})


def dense_embedding_gradients(ids: Tensor, grad_outputs: Tensor, vocabulary: int, padding_idx: int | None, theta: Tensor, decay: float) -> Tensor:
    """``G[i] = N sum_l e_(id_il) delta_il^T + decay theta`` formed row by row: ``[N, V * D]``."""
    n, width = grad_outputs.shape[0], grad_outputs.shape[-1]
    rows = torch.zeros(n, vocabulary, width, dtype=grad_outputs.dtype)
    for i in range(n):
        for position, token in enumerate(ids[i].reshape(-1).tolist()):
            if token != padding_idx:
                rows[i, token] += n * grad_outputs[i].reshape(-1, width)[position]
    return (rows + decay * theta).reshape(n, -1)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("positions", [1, 3])
def test_factored_embedding_statistics_equal_those_of_formed_gradients_and_form_neither_blocks_nor_one_hot_ids(
    positions: int, weight_decay: float, padding_idx: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sample's gradient of a language model's table (``N V D`` numbers) was formed at every
    tracked step, and its ids one-hot (``N L V``, gigabytes) built."""
    from cockpit_cli.instruments.factored_gradients import FactoredEmbedding
    from cockpit_cli.instruments.histograms import HistogramSpec
    from cockpit_cli.instruments.sample_pass import _joint_counts

    generator = torch.Generator().manual_seed(positions)
    vocabulary, width, n = 7, 3, 5
    ids = torch.randint(0, vocabulary, (n, positions), generator=generator)
    grad_outputs = torch.randn(n, positions, width, generator=generator, dtype=torch.float64) / n
    theta, vector = torch.randn(2, vocabulary, width, generator=generator, dtype=torch.float64)
    source = FactoredEmbedding(ids, grad_outputs, vocabulary, padding_idx).regularized(theta, weight_decay)
    dense = dense_embedding_gradients(ids, grad_outputs, vocabulary, padding_idx, theta, weight_decay)
    formed = torch.cat(list(source.blocks()))  # the blocks the statistics no longer need
    torch.testing.assert_close(formed, dense)
    monkeypatch.setattr(FactoredEmbedding, "blocks", None)
    g = dense.mean(0)
    torch.testing.assert_close(source.mean(), g)
    torch.testing.assert_close(source.products(vector.reshape(-1)), dense @ vector.reshape(-1))
    torch.testing.assert_close(source.square_norms(), dense.square().sum(1))
    torch.testing.assert_close(source.second_moment(), dense.square().sum(0))
    torch.testing.assert_close(source.centered_sum(g), (dense - g).square().sum())
    spec, columns_spec = HistogramSpec(11, -0.5, 0.5), HistogramSpec(4, -1.0, 1.0)
    assert torch.equal(source.histogram(spec), spec.counts_of(formed))
    columns = columns_spec.bin_of(theta.reshape(-1))
    assert torch.equal(source.joint_histogram(spec, columns, columns_spec.bins), _joint_counts(spec, formed, columns, columns_spec.bins))
    assert source._one_hot is None
