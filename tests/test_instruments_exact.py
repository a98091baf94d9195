"""The instruments engine against the brute-force references: first-order quantities,
histograms, per-layer diagnostics, schedules, availability, non-interference and settings.

Every run below trains a float64 reference model (``reference.mlp`` / ``reference.cnn``) for a
few steps of N = 8 samples through :class:`Instruments`, exactly as the training loop does
(the regulariser ``0.5 * lambda * sum ||w||^2`` is added to the loss by the loop), and keeps
``theta_t`` at the start of every step. The references are then evaluated on an untouched copy
of the model with ``theta_t`` loaded. Curvature quantities and Alpha are checked in
``test_instruments_curvature`` and ``test_instruments_alpha``, which use the helpers here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import reference as ref
import reference_curvature as curv
from cockpit_cli.config import parse_config
from cockpit_cli.errors import CockpitError
from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Quantity, Schedule, factored_gradients
from cockpit_cli.instruments.backend import GradientCapture
from cockpit_cli.instruments.engine import JACOBIAN_REASON
from cockpit_cli.instruments.output_hooks import OutputGradientHooks
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.settings import build_quantities

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

N = 8
LR = 0.1
DECAY = 0.3
SEEDS = (0, 1)
BUILDERS: dict[str, Callable[[int], nn.Module]] = {"mlp": ref.mlp, "cnn": ref.cnn}
CASES = [(kind, loss) for kind in BUILDERS for loss in ("ce", "mse")]
HIST_BINS = 11  # odd: exact zeros (dead units) sit in the middle of a bin, never on an edge
HIST2D_BINS = (7, 5)

FIRST_ORDER = (
    "GradNorm", "Distance", "UpdateSize", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "CABS",
    "EarlyStopping", "GradHist1d", "GradHist2d", "LayerStats", "Activations", "InputStats", "Loss", "Time",
)  # fmt: skip
CURVATURE = ("HessTrace", "TICDiag", "TICTrace", "HessMaxEV")
# Alpha: test_instruments_alpha.py; curvature: test_instruments_curvature.py.
CHECKED = {*FIRST_ORDER, *CURVATURE, "Alpha"}

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the tensors are tiny, and idle threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD with the tests' learning rate."""
    return torch.optim.SGD(params, lr=LR)


# --- running the engine ------------------------------------------------------------------------


@dataclass
class Run:
    """What a few instrumented training steps produced.

    Attributes:
        records: ``{step: {quantity: value}}`` as popped from ``completed`` and ``finish``.
        thetas: Parameters at the start of every step, then after the last step.
        batches: The batch of every step.
        rng_states: The CPU random state just before every step's forward pass.
        pristine: An unextended copy of the model as it was before training (for references).
        instruments: The engine (``None`` for plain training).
        completed_keys: For every step, the steps ``completed(step)`` returned.
    """

    records: dict[int, dict[str, Any]]
    thetas: list[list[Tensor]]
    batches: list[ref.Batch]
    rng_states: list[Tensor]
    pristine: nn.Module
    instruments: Instruments | None
    completed_keys: list[list[int]] = field(default_factory=list)

    def reference_model(self, step: int) -> nn.Module:
        """A fresh copy of the model with ``theta_step`` loaded."""
        model = copy.deepcopy(self.pristine)
        load(model, self.thetas[step])
        return model


def load(model: nn.Module, theta: Sequence[Tensor]) -> None:
    """Copy ``theta`` into the trainable parameters of ``model``."""
    with torch.no_grad():
        for p, value in zip(ref.trainable(model), theta):
            p.copy_(value)


def snapshot(model: nn.Module) -> list[Tensor]:
    """Detached copies of the trainable parameters."""
    return [p.detach().clone() for p in ref.trainable(model)]


def make_batches(kind: str, loss: str, seed: int, steps: int) -> list[ref.Batch]:
    """``steps`` different batches of N samples for ``kind`` and ``loss``."""
    return [ref.batch(kind, loss, N, 1000 * seed + 100 + step) for step in range(steps)]


def quantities(names: Sequence[str], schedule: Schedule | None = None, **options: dict[str, Any]) -> list[Quantity]:
    """One quantity per name, all with ``schedule`` (default: every step); ``options`` by name."""
    return [QUANTITIES[name](schedule or Schedule(), options.get(name)) for name in names]


def train(
    model: nn.Module,
    batches: Sequence[ref.Batch],
    tracked: Sequence[Quantity] | None,
    optimizer: OptimizerFactory = sgd,
    weight_decay: float = 0.0,
    curvature: str = "hessian",
    loss_weight: float = 1.0,
    output_term: Callable[[Tensor], Tensor] | None = None,
) -> Run:
    """Train ``model`` on ``batches`` like the training loop, with instruments unless ``tracked`` is None.

    Args:
        model: The network (trained in place).
        batches: One batch per step.
        tracked: The quantities, or ``None`` for plain training with ``loss.backward()``.
        optimizer: Builds the optimizer from the trainable parameters.
        weight_decay: lambda of the regulariser on the weights (added to the loss here).
        curvature: The engine's curvature diagonal.
        loss_weight: The factor of the loss module's output in the loss backpropagated.
        output_term: A term of the outputs added to the loss (one the loss module does not compute).
    """
    pristine = copy.deepcopy(model)
    params = ref.trainable(model)
    decayed = ref.weights(model) if weight_decay else []
    opt = optimizer(params)
    first = batches[0]
    instruments = None
    if tracked is not None:
        instruments = Instruments(
            model, first.loss_fn, first.per_sample_loss_fn, opt, tracked, weight_decay=weight_decay, decayed_parameters=decayed, curvature=curvature
        )
    run = Run({}, [], list(batches), [], pristine, instruments)
    loss_fn = first.loss_fn  # the one the engine extends, as in the training loop
    for step, (inputs, targets, *_) in enumerate(batches):
        run.thetas.append(snapshot(model))
        run.rng_states.append(torch.get_rng_state())
        opt.zero_grad()
        outputs = model(inputs)
        loss = (loss_fn(outputs, targets) if loss_weight == 1.0 else loss_weight * loss_fn(outputs, targets)) + ref.regularizer(decayed, weight_decay)
        if output_term is not None:
            loss = loss + output_term(outputs)
        if instruments is None:
            loss.backward()
            opt.step()
            continue
        instruments.backward(step, loss, inputs, outputs, targets)
        opt.step()
        instruments.after_update(step)
        done = instruments.completed(step)
        run.completed_keys.append(list(done))
        assert not set(done) & set(run.records), "a step was completed twice"
        run.records.update(done)
    run.thetas.append(snapshot(model))
    if instruments is not None:
        rest = instruments.finish()
        assert not set(rest) & set(run.records), "a step was completed twice"
        run.records.update(rest)
    return run


def engine_step(instruments: Instruments, opt: torch.optim.Optimizer, step: int, loss: Tensor, inputs: Any, outputs: Any, targets: Any) -> dict[int, dict[str, Any]]:
    """The loop's part after a forward pass: the backward pass through the instruments, the
    update, and the values completed by it."""
    instruments.backward(step, loss, inputs, outputs, targets)
    opt.step()
    instruments.after_update(step)
    return instruments.completed(step)


# --- references ----------------------------------------------------------------------------------


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules whose outputs Activations reports: activations and layers with trainable parameters."""
    activations = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU)
    return {
        name: module
        for name, module in model.named_modules()
        if name and not list(module.children()) and (isinstance(module, activations) or any(p.requires_grad for p in module.parameters(recurse=False)))
    }


def symmetric_range(values: Tensor, quantile: float) -> tuple[float, float]:
    """``(-q, q)`` with ``q`` the ``quantile`` of ``|values|``: some values fall outside (clamped)."""
    q = float(torch.quantile(values.detach().abs().reshape(-1), quantile))
    return (-q, q)


def histogram_options(run_model: nn.Module, batch: ref.Batch, weight_decay: float) -> dict[str, dict[str, Any]]:
    """Histogram options with ranges inside the step-0 gradients and parameters (so there is clamping)."""
    decayed = ref.weights(run_model) if weight_decay else None
    grads = ref.flatten(ref.per_sample_gradients(run_model, batch.per_sample_loss_fn, batch.inputs, batch.targets, decayed, weight_decay))
    theta = torch.cat([p.detach().reshape(-1) for p in ref.trainable(run_model)])
    return {
        "GradHist1d": {"bins": HIST_BINS, "range": symmetric_range(grads, 0.8)},
        "GradHist2d": {"bins": HIST2D_BINS, "range": (symmetric_range(grads, 0.85), symmetric_range(theta, 0.7))},
    }


def assert_close(actual: Any, expected: Any, rel: float = 1e-9, abs: float = 1e-12) -> None:
    """Float or list of floats, to ``rel`` / ``abs``."""
    assert actual == pytest.approx(expected, rel=rel, abs=abs)


def check_first_order(run: Run, step: int, weight_decay: float = 0.0, lr: float = LR, names: Sequence[str] = FIRST_ORDER) -> None:
    """Compare the record of ``step`` with the references at ``theta_step`` on that step's batch."""
    values = run.records[step]
    model = run.reference_model(step)
    inputs, targets, loss_fn, per_sample = run.batches[step]
    decayed = ref.weights(model) if weight_decay else None
    grads = ref.per_sample_gradients(model, per_sample, inputs, targets, decayed, weight_decay)
    theta, theta_next, theta_0 = run.thetas[step], run.thetas[step + 1], run.thetas[0]
    loss = float(ref.individual_losses(model, per_sample, inputs, targets, decayed, weight_decay).mean())
    expected: dict[str, Callable[[], Any]] = {
        "GradNorm": lambda: ref.grad_norm(grads),
        "Distance": lambda: ref.distance(theta, theta_0),
        "UpdateSize": lambda: ref.update_size(theta_next, theta),
        "NormTest": lambda: ref.norm_test(grads),
        "InnerTest": lambda: ref.inner_test(grads),
        "OrthoTest": lambda: ref.ortho_test(grads),
        "MeanGSNR": lambda: ref.mean_gsnr(grads),
        "CABS": lambda: ref.cabs(grads, loss, lr),
        "EarlyStopping": lambda: ref.early_stopping(grads),
        "InputStats": lambda: ref.input_stats(inputs),
        "Loss": lambda: loss,
    }
    for name in names:
        if name in expected:
            assert_close(values[name], expected[name]())
    if "LayerStats" in names:
        stats = values["LayerStats"]
        assert set(stats) == {"weight_norm", "grad_norm", "update_ratio", "zero_grad_fraction"}
        assert_close(stats["weight_norm"], ref.param_norms(theta))
        assert_close(stats["grad_norm"], ref.grad_norm(grads))
        assert_close(stats["update_ratio"], ref.update_ratio(theta_next, theta))
        assert stats["zero_grad_fraction"] == ref.zero_grad_fraction(grads)
    if "Activations" in names:
        expected_stats = {name: ref.activation_stats(model, module, inputs) for name, module in activation_modules(model).items()}
        expected_stats = {name: stats for name, stats in expected_stats.items() if stats is not None}  # a skipped layer has no output
        assert set(values["Activations"]) == set(expected_stats)
        for name, stats in expected_stats.items():
            assert_close(values["Activations"][name], stats)
    if "GradHist1d" in names:
        check_hist1d(values["GradHist1d"], grads)
    if "GradHist2d" in names:
        check_hist2d(values["GradHist2d"], grads, theta)
    if "Time" in names:
        assert isinstance(values["Time"], float) and values["Time"] >= 0.0


def check_hist1d(hist: dict[str, Any], grads: list[Tensor]) -> None:
    """Exact counts, whole network and per parameter, in the range the engine reports."""
    low, high = hist["range"]
    bins = len(hist["counts"])
    assert hist["counts"] == ref.grad_hist1d(grads, bins, (low, high)).tolist()
    assert hist["per_parameter"] == [ref.grad_hist1d(g.reshape(g.shape[0], -1), bins, (low, high)).tolist() for g in grads]


def check_hist2d(hist: dict[str, Any], grads: list[Tensor], theta: list[Tensor]) -> None:
    """Exact joint counts, whole network and per parameter, in the ranges the engine reports."""
    (g_low, g_high), (p_low, p_high) = hist["range"]
    bins = (len(hist["counts"]), len(hist["counts"][0]))
    ranges = ((g_low, g_high), (p_low, p_high))
    assert hist["counts"] == ref.grad_hist2d(grads, theta, bins, ranges).tolist()
    assert hist["per_parameter"] == [h.tolist() for h in ref.grad_hist2d_per_param(grads, theta, bins, ranges)]


# --- first-order quantities ----------------------------------------------------------------------


def test_every_registered_quantity_is_checked() -> None:
    """A new quantity must get a test here or in the curvature / Alpha files."""
    assert set(QUANTITIES) == CHECKED


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind, loss", CASES)
def test_first_order_quantities_match_references(kind: str, loss: str, seed: int) -> None:
    model = BUILDERS[kind](seed)
    batches = make_batches(kind, loss, seed, 3)
    options = histogram_options(model, batches[0], 0.0)
    run = train(model, batches, quantities(FIRST_ORDER, **options))
    assert run.instruments.unavailable == {}
    assert run.instruments.support.per_sample == "backpack"
    assert sorted(run.records) == [0, 1, 2]
    for step in range(3):
        assert set(run.records[step]) == set(FIRST_ORDER)
        check_first_order(run, step)
    assert run.records[0]["Distance"] == [0.0] * len(run.thetas[0])
    times = [run.records[step]["Time"] for step in range(3)]
    assert times == sorted(times)


def test_histogram_ranges_exercise_clamping_and_several_bins() -> None:
    """The ranges chosen above leave values outside (clamped into the edge bins) and spread the rest."""
    for kind, loss in CASES:
        model = BUILDERS[kind](0)
        batch = make_batches(kind, loss, 0, 1)[0]
        options = histogram_options(model, batch, 0.0)
        grads = ref.per_sample_gradients(model, batch.per_sample_loss_fn, batch.inputs, batch.targets)
        flat = ref.flatten(grads)
        low, high = options["GradHist1d"]["range"]
        assert ((flat < low) | (flat > high)).sum() > 0
        assert (ref.grad_hist1d(grads, HIST_BINS, (low, high)) > 0).sum() >= 5
        theta = torch.cat([p.detach().reshape(-1) for p in ref.trainable(model)])
        p_low, p_high = options["GradHist2d"]["range"][1]
        assert ((theta < p_low) | (theta > p_high)).sum() > 0


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_histograms_on_commensurate_ranges_come_from_one_joint_count(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-D gradient range made of the middle 1-D bins: both histograms from the joint counts
    of a common refinement (checked to be taken), still exact against the references."""
    from cockpit_cli.instruments import histograms

    refinements: list[histograms.Refinement | None] = []
    common_refinement = histograms.common_refinement

    def spied(a: HistogramSpec, b: HistogramSpec, max_bins: int = histograms.MAX_FINE_BINS) -> histograms.Refinement | None:
        refinements.append(common_refinement(a, b, max_bins))
        return refinements[-1]

    monkeypatch.setattr(histograms, "common_refinement", spied)
    model = BUILDERS[kind](0)
    batches = make_batches(kind, "ce", 0, 2)
    options = histogram_options(model, batches[0], 0.0)
    low, high = options["GradHist1d"]["range"]
    inner = 7 * (high - low) / HIST_BINS / 2  # the middle 7 of the 11 bins
    options["GradHist2d"] = {"bins": (7, 5), "range": ((-inner, inner), options["GradHist2d"]["range"][1])}
    run = train(model, batches, quantities(("GradHist1d", "GradHist2d"), **options))
    assert refinements and all(grid is not None and grid.fine.bins == HIST_BINS for grid in refinements)
    for step in range(2):
        check_first_order(run, step, names=("GradHist1d", "GradHist2d"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind, loss", CASES)
def test_first_order_quantities_with_weight_decay(kind: str, loss: str, seed: int) -> None:
    """``g_i`` includes ``lambda * w`` on the decayed weights; the loss includes the regulariser."""
    model = BUILDERS[kind](seed)
    batches = make_batches(kind, loss, seed, 2)
    options = histogram_options(model, batches[0], DECAY)
    run = train(model, batches, quantities(FIRST_ORDER, **options), weight_decay=DECAY)
    for step in range(2):
        check_first_order(run, step, weight_decay=DECAY)


class SGDAccumulating(torch.optim.SGD):
    """SGD whose ``zero_grad`` leaves a constant in the gradients, as a loop that accumulates
    gradients over several backward passes holds an earlier pass's gradients."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = torch.full_like(p, 0.5)


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_the_mean_gradient_is_the_training_s_own_unless_gradients_accumulate(kind: str, weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the gradients start empty, a layer's mean gradient is the one the backward pass
    forms anyway: the factors never form it a second time. Where they hold values already, the
    backward pass adds to them, and the mean comes from the factors. Both match the references
    (GradNorm and LayerStats report the accumulated gradients, which training steps with)."""
    formed: list[str] = []
    for source in (factored_gradients.FactoredLinear, factored_gradients.FactoredConv):
        original = source.data_mean
        monkeypatch.setattr(source, "data_mean", lambda self, _original=original: formed.append(type(self).__name__) or _original(self))
    accumulating = [name for name in FIRST_ORDER if name not in ("CABS", "EarlyStopping", "GradNorm", "LayerStats")]  # CABS, EB: plain SGD only
    for optimizer, names, forms in ((sgd, FIRST_ORDER, False), (lambda params: SGDAccumulating(params, lr=LR), accumulating, True)):
        formed.clear()
        model = BUILDERS[kind](0)
        batches = make_batches(kind, "ce", 0, 2)
        run = train(model, batches, quantities(names, **histogram_options(model, batches[0], weight_decay)), optimizer=optimizer, weight_decay=weight_decay)
        assert run.instruments.unavailable == {}
        assert bool(formed) == forms
        for step in range(2):
            check_first_order(run, step, weight_decay=weight_decay, names=names)


def test_only_reductions_that_read_the_mean_wait_for_the_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose only per-sample values are Alpha's projections (the step after a tracked
    one) takes each layer's products at once (both parameters in one pass), handing over no
    per-parameter source: waiting would keep the layer's factors beside its gradient."""
    from cockpit_cli.instruments import backend

    waited: dict[int, set[bool]] = {}
    steps: list[int] = []
    projected: list[int] = []
    original_backward, original_hand_over, layer_products = Instruments.backward, OutputGradientHooks._hand_over, backend.layer_products

    def backward(self: Instruments, step: int, *args: Any) -> None:
        steps.append(step)
        original_backward(self, step, *args)

    def hand_over(self: OutputGradientHooks, *args: Any) -> None:
        waited.setdefault(steps[-1], set()).add(self.at_gradients)
        original_hand_over(self, *args)

    def products(*args: Any) -> Tensor:
        projected.append(steps[-1])
        return layer_products(*args)

    monkeypatch.setattr(Instruments, "backward", backward)
    monkeypatch.setattr(OutputGradientHooks, "_hand_over", hand_over)
    monkeypatch.setattr(backend, "layer_products", products)
    run = train(BUILDERS["mlp"](0), make_batches("mlp", "ce", 0, 6), quantities(PRESETS["economy"], Schedule(every=4)))
    assert waited == {0: {True}, 4: {True}}
    assert projected == [1, 1, 1, 5, 5, 5]  # the mlp's three layers
    assert not run.instruments.unavailable


def test_the_projection_direction_is_released_layer_by_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alpha's direction (the last update, as large as the parameters) is dropped parameter by
    parameter as the backward pass takes its products, never kept whole beside the gradients."""
    released: list[list[bool]] = []
    original = GradientCapture.backward

    def backward(self: GradientCapture, *args: Any, **kwargs: Any) -> Any:
        options = kwargs["options"]
        result = original(self, *args, **kwargs)
        if options.direction is not None:
            released.append([part is None for part in options.direction])
        return result

    monkeypatch.setattr(GradientCapture, "backward", backward)
    model = BUILDERS["cnn"](0)
    batches = make_batches("cnn", "ce", 0, 3)
    run = train(model, batches, quantities(("Alpha",)))
    assert released == [[True] * len(run.thetas[0])] * 2  # steps 1 and 2 end the Alpha of 0 and 1
    assert set(run.records) == {0, 1} and all(isinstance(run.records[step]["Alpha"], float) for step in (0, 1))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_batch_of_one_sample_has_no_variance_quantities(kind: str) -> None:
    """A last batch of one sample (a data set one longer than a multiple of the batch size):
    the quantities of the samples' spread have no value there, the others go on."""
    batches = [ref.batch(kind, "ce", size, 100 + step) for step, size in enumerate((N, 1, N))]
    spread = ("NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "CABS", "EarlyStopping")
    run = train(BUILDERS[kind](0), batches, quantities(FIRST_ORDER))
    assert not set(spread) & set(run.records[1]) and run.instruments.unavailable == {}
    check_first_order(run, 1, names=[name for name in FIRST_ORDER if name not in spread])
    for step in (0, 2):
        check_first_order(run, step)


def dead_unit_mlp(seed: int) -> nn.Sequential:
    """The reference mlp with two of the five first hidden units that never fire."""
    model = ref.mlp(seed)
    with torch.no_grad():
        model[0].bias[:2] = -100.0
    return model


def test_layer_stats_and_activations_see_dead_units() -> None:
    tracked = quantities(("LayerStats", "Activations", "GradHist1d"), GradHist1d={"range": (-0.05, 0.05), "bins": 5})
    run = train(dead_unit_mlp(0), make_batches("mlp", "ce", 0, 2), tracked)
    for step in range(2):
        check_first_order(run, step, names=("LayerStats", "Activations", "GradHist1d"))
        stats = run.records[step]["LayerStats"]
        assert stats["zero_grad_fraction"][0] == pytest.approx(2 / 5) and stats["zero_grad_fraction"][1] == pytest.approx(2 / 5)
        assert run.records[step]["Activations"]["1"]["zero_fraction"] >= 2 / 5
    assert tracked[0].state_dict() == {"partial": {}}  # nothing kept of steps whose values are out


def test_layer_stats_after_a_divergence_are_nan() -> None:
    """Once the parameters are NaN, the update/weight ratio is NaN (it read inf: the ratio of a
    parameter at exactly zero that moves)."""
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 3), quantities(("LayerStats",)), lambda params: torch.optim.SGD(params, lr=math.nan))
    stats = run.records[1]["LayerStats"]
    assert all(math.isnan(value) for key in ("weight_norm", "update_ratio") for value in stats[key])


def test_activations_watch_every_activation_and_every_layer_with_parameters() -> None:
    """The watched layers: activation modules of every common kind and leaf layers with trainable
    parameters; neither containers, parameterless layers such as Dropout or Flatten, nor frozen layers."""
    from cockpit_cli.instruments.activation_recorder import watched_layers

    activations = [nn.ReLU(), nn.LeakyReLU(), nn.ELU(), nn.SELU(), nn.Sigmoid(), nn.Tanh(), nn.Softplus(), nn.GELU(), nn.SiLU()]
    frozen = nn.Linear(4, 4).requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*activations), nn.Dropout(0.1), frozen, nn.Flatten(), nn.Linear(4, 2))
    names = [name for name, _ in watched_layers(model)]
    assert names == ["0", *(f"1.{k}" for k in range(len(activations))), "5"]


def test_layer_stats_update_ratio_of_parameters_at_zero() -> None:
    """||update|| / ||theta|| of a parameter at zero: infinite where it moves, 0 where it stays."""
    model = ref.mlp(0)
    with torch.no_grad():
        model[0].bias.zero_()
        model[4].weight.zero_()  # the hidden layers get no gradient: they stay, 0.bias at zero
        model[4].bias.zero_()
    run = train(model, make_batches("mlp", "ce", 0, 1), quantities(("LayerStats",)))
    ratios = run.records[0]["LayerStats"]["update_ratio"]
    assert ratios == [0.0, 0.0, 0.0, 0.0, math.inf, math.inf]  # 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias


def test_adaptive_histogram_range_follows_the_largest_gradient() -> None:
    model = ref.mlp(0)
    batches = make_batches("mlp", "mse", 0, 2)
    run = train(model, batches, quantities(("GradHist1d",), GradHist1d={"bins": HIST_BINS, "adaptive": True}))
    assert run.records[0]["GradHist1d"]["range"] == [-2.0, 2.0]
    first = ref.flatten(ref.per_sample_gradients(run.reference_model(0), batches[0].per_sample_loss_fn, batches[0].inputs, batches[0].targets))
    largest = float(first.abs().max())
    assert run.records[1]["GradHist1d"]["range"] == pytest.approx([-largest, largest], rel=1e-12)
    for step in range(2):
        check_first_order(run, step, names=("GradHist1d",))


def test_adaptive_histogram_range_stays_where_every_gradient_is_zero() -> None:
    """A step whose per-sample gradients are all zero (a zero last layer, targets 0) has no
    largest gradient to follow: the range stays, and every element is counted in the bin of 0."""
    model = ref.mlp(0)
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.zero_()
    batches = [batch._replace(targets=torch.zeros_like(batch.targets)) for batch in make_batches("mlp", "mse", 0, 3)]
    run = train(model, batches, quantities(("GradHist1d",), GradHist1d={"bins": HIST_BINS, "adaptive": True}))
    elements = N * sum(theta.numel() for theta in run.thetas[0])
    for step in range(3):
        assert run.records[step]["GradHist1d"]["range"] == [-2.0, 2.0]
        assert run.records[step]["GradHist1d"]["counts"] == [0] * (HIST_BINS // 2) + [elements] + [0] * (HIST_BINS // 2)


def test_histogram_spec_clamps_and_drops_nan() -> None:
    spec = HistogramSpec(4, -2.0, 2.0)
    values = torch.tensor([-5.0, -2.0, -1.99, 0.0, 1.99, 2.0, 7.0, float("nan")], dtype=torch.float64)
    assert spec.bin_of(values).tolist() == [0, 0, 0, 2, 3, 3, 3, 4]
    assert spec.count(values.reshape(2, 4)).tolist() == [3, 0, 1, 3]  # NaN dropped, outside clamped


def test_2d_histogram_clamps_and_drops_nan_gradients_and_parameters() -> None:
    """Every cell of a 3 x 2 histogram against a count by hand; a NaN gradient element or a
    NaN parameter element is dropped from every cell."""
    from cockpit_cli.instruments import reductions as r
    from cockpit_cli.instruments.sample_pass import DenseSamples, sample_statistics

    nan = float("nan")
    theta = torch.tensor([-9.0, 0.5, nan, -0.5], dtype=torch.float64)  # columns 0, 1, dropped, 0
    samples = torch.tensor([[-3.0, 0.0, 0.0, 0.9], [nan, 2.5, 1.0, -0.2], [0.4, -0.4, 0.0, nan]], dtype=torch.float64)
    options = r.ReductionOptions(hist2d=(HistogramSpec(3, -1.5, 1.5), HistogramSpec(2, -1.0, 1.0)))
    stats = sample_statistics(DenseSamples(samples), None, frozenset({r.HIST2D_COUNTS}), theta, options)
    expected = torch.zeros(3, 2, dtype=torch.int64)
    for row in samples.tolist():
        for value, parameter in zip(row, theta.tolist()):
            if value == value and parameter == parameter:
                expected[min(max(int((value + 1.5) // 1.0), 0), 2), min(max(int((parameter + 1.0) // 1.0), 0), 1)] += 1
    assert stats.hist2d_counts.tolist() == expected.tolist()
    assert int(expected.sum()) == 7  # 12 elements less 3 NaN parameters and 2 NaN gradients


def test_reductions_split_into_row_blocks_give_the_same_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.instruments import reductions as r
    from cockpit_cli.instruments import row_blocks
    from cockpit_cli.instruments.accumulator import Accumulator
    from cockpit_cli.instruments.sample_pass import DenseSamples, reduce_layer

    samples = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta = torch.randn(5, dtype=torch.float64)
    requested = frozenset({r.SAMPLE_SQ_NORMS, r.CENTERED_TOTAL, r.EB_SUM, r.HIST1D, r.HIST2D})
    whole = Accumulator(1)
    reduce_layer(0, DenseSamples(samples.clone()), theta, None, requested, whole, r.ReductionOptions())
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 10)  # blocks of 2 rows
    assert len(row_blocks.row_chunks(samples)) == 4
    blocked = Accumulator(1)
    reduce_layer(0, DenseSamples(samples.clone()), theta, None, requested, blocked, r.ReductionOptions())
    for name in requested:
        assert torch.allclose(whole.totals[name].double(), blocked.totals[name].double(), rtol=1e-12), name


def test_reductions_run_only_where_their_inputs_exist() -> None:
    """A parameter with per-sample gradients but no curvature diagonal gets the reductions of the
    first, and the curvature ones are left out without a failure (and the other way round)."""
    from cockpit_cli.instruments import reductions as r
    from cockpit_cli.instruments.accumulator import Accumulator
    from cockpit_cli.instruments.sample_pass import DenseSamples, reduce_layer

    requested = frozenset({r.GRAD_SQ_NORM, r.TIC_DIAG_SUM, r.CURVATURE_TRACE})
    assert r.runnable(requested, samples=True, curvature=False) == {r.GRAD_SQ_NORM}
    assert r.runnable(requested, samples=False, curvature=True) == {r.CURVATURE_TRACE}
    assert r.runnable(requested, samples=True, curvature=True) == requested
    samples = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    acc = Accumulator(1)
    reduce_layer(0, DenseSamples(samples), torch.zeros(3, dtype=torch.float64), None, requested, acc, r.ReductionOptions())
    assert not acc.failed and set(acc.totals) == {r.GRAD_SQ_NORM}
    assert acc.scalar(r.GRAD_SQ_NORM) == pytest.approx(float(samples.mean(0).square().sum()), rel=1e-14)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("name", ["NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "CABS", "EarlyStopping", "GradHist1d", "GradHist2d"])
def test_a_quantity_tracked_alone_gets_every_value_it_reads(name: str, kind: str) -> None:
    """Alone, a quantity's reductions are the only ones requested (no other quantity's asks for
    the mean gradient or a statistic it shares): it still gets all it reads, and matches the references."""
    model = BUILDERS[kind](0)
    batches = make_batches(kind, "ce", 0, 1)
    run = train(model, batches, quantities((name,), **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.unavailable == {}
    check_first_order(run, 0, names=(name,))


# --- schedules and lag ---------------------------------------------------------------------------


def test_offset_schedule_and_absent_quantities() -> None:
    tracked = [QUANTITIES["GradNorm"](Schedule(every=3, offset=1)), QUANTITIES["Loss"](Schedule(every=2))]
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 9), tracked)
    assert [s for s in sorted(run.records) if "GradNorm" in run.records[s]] == [1, 4, 7]
    assert [s for s in sorted(run.records) if "Loss" in run.records[s]] == [0, 2, 4, 6, 8]
    assert sorted(run.records) == [0, 1, 2, 4, 6, 7, 8]  # steps 3 and 5 track nothing
    assert set(run.records[1]) == {"GradNorm"} and set(run.records[4]) == {"GradNorm", "Loss"}
    check_first_order(run, 4, names=("GradNorm", "Loss"))


def test_log_spaced_schedule() -> None:
    schedule = Schedule(spacing="log", points=5, last_step=20)
    run = train(ref.mlp(0), make_batches("mlp", "mse", 0, 21), quantities(("GradNorm", "UpdateSize"), schedule))
    assert sorted(run.records) == [0, 1, 4, 9, 20]
    assert all(set(values) == {"GradNorm", "UpdateSize"} for values in run.records.values())
    check_first_order(run, 9, names=("GradNorm", "UpdateSize"))


@pytest.mark.parametrize("schedule", [Schedule(), Schedule(every=3), Schedule(every=5, offset=7), Schedule(spacing="log", points=9, last_step=60)])
def test_next_step_is_the_first_tracked_step_from_there(schedule: Schedule) -> None:
    for step in range(70):
        expected = next((s for s in range(step, 200) if schedule(s)), None)
        assert schedule.next_step(step) == expected


def test_log_spacing_with_one_point_or_no_later_step_tracks_step_0() -> None:
    assert [s for s in range(60) if Schedule(spacing="log", points=1, last_step=50)(s)] == [0]
    assert [s for s in range(60) if Schedule(spacing="log", points=5, last_step=0)(s)] == [0]


def test_schedules_describe_their_steps() -> None:
    """The manifest's description of each quantity's schedule, offset included."""
    assert Schedule().describe() == "every step from 0"
    assert Schedule(offset=3).describe() == "every step from 3"
    assert Schedule(every=5, offset=7).describe() == "every 5 steps from 7"
    assert Schedule(spacing="log", points=9, last_step=60).describe() == "9 log-spaced steps up to 60"
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 1), [QUANTITIES["GradNorm"](Schedule(every=4, offset=2))])
    assert run.instruments.describe()["quantities"] == {"GradNorm": "every 4 steps from 2"}


def test_loading_an_earlier_state_tracks_the_steps_due_from_there_again() -> None:
    """An engine idle until its next due step (3), given the state it had before step 0, tracks
    step 0 again: what it knew about the coming steps is not kept."""
    model = ref.mlp(0)
    batches = make_batches("mlp", "ce", 0, 2)
    optimizer = sgd(ref.trainable(model))
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, optimizer, quantities(("GradNorm",), Schedule(every=3)))

    def step(index: int) -> None:
        inputs, targets, loss_fn, _ = batches[index]
        optimizer.zero_grad()
        outputs = model(inputs)
        instruments.backward(index, loss_fn(outputs, targets), inputs, outputs, targets)
        optimizer.step()
        instruments.after_update(index)

    start = copy.deepcopy(instruments.state_dict())
    for index in range(2):  # step 1 is idle: nothing is due before step 3
        step(index)
    assert sorted(instruments.completed(1)) == [0]
    instruments.load_state_dict(start)
    step(0)
    assert sorted(instruments.completed(0)) == [0]


def test_idle_steps_ask_no_quantity_and_tracked_steps_stay_on_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between tracked steps (Alpha every 5 from 2, with its completion the step after, and
    GradNorm on log-spaced steps) the engine knows when the next one is due and asks no quantity
    at the idle steps in between; the values land at exactly the scheduled steps."""
    alpha = quantities(("Alpha",), Schedule(every=5, offset=2))[0]
    grad_norm = quantities(("GradNorm",), Schedule(spacing="log", points=4, last_step=13))[0]
    asked = []
    for quantity in (alpha, grad_norm):
        original = quantity.is_active
        monkeypatch.setattr(quantity, "is_active", lambda step, original=original: (asked.append(step), original(step))[1])
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 14), [alpha, grad_norm])
    assert [s for s in sorted(run.records) if "Alpha" in run.records[s]] == [2, 7, 12]
    assert [s for s in sorted(run.records) if "GradNorm" in run.records[s]] == [0, 1, 5, 13]
    active = {0, 1, 2, 3, 5, 7, 8, 12, 13}  # tracked steps and Alpha's completions (3, 8, 13)
    assert sorted(set(asked) - active) == [4, 6, 9]  # only the first idle step after activity looks ahead


def test_idle_stretches_run_without_the_forward_hook() -> None:
    """The engine's forward pre-hook runs at due steps and at the first idle step after them
    (which switches recording off); the other idle steps' forward passes run without any hook,
    and the hook is back for the next due step, whose values land on schedule."""
    model = ref.mlp(0)
    hooked: list[bool] = []
    model[0].register_forward_pre_hook(lambda module, args: hooked.append(bool(model._forward_pre_hooks)))
    run = train(model, make_batches("mlp", "ce", 0, 12), quantities(("GradNorm", "GradHist1d"), Schedule(every=5)))
    assert [step for step, present in enumerate(hooked) if present] == [0, 1, 5, 6, 10, 11]
    assert sorted(run.records) == [0, 5, 10]
    for step in (5, 10):
        check_first_order(run, step, names=("GradNorm", "GradHist1d"))
    run.instruments.finish()
    assert not model._forward_pre_hooks


def test_completed_waits_for_alpha() -> None:
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 4), quantities(("Alpha", "GradNorm")))
    assert run.instruments.lag == 1
    assert run.completed_keys == [[], [0], [1], [2]]
    assert [set(run.records[s]) for s in range(3)] == [{"Alpha", "GradNorm"}] * 3
    assert set(run.records[3]) == {"GradNorm"}  # the last step's Alpha would need one more step


def test_completed_without_lag_returns_each_step_at_once() -> None:
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 3), quantities(("GradNorm",)))
    assert run.completed_keys == [[0], [1], [2]]


# --- availability ----------------------------------------------------------------------------------


def test_the_reason_for_leaving_out_plain_sgd_quantities_names_what_is_not_plain() -> None:
    from cockpit_cli.instruments.engine import _unlike_plain_sgd

    model = torch.nn.Linear(2, 1)
    parameters = list(model.parameters())
    assert _unlike_plain_sgd(torch.optim.SGD(parameters, lr=0.1, momentum=0.9), model) == "SGD with momentum 0.9"
    assert _unlike_plain_sgd(torch.optim.SGD(parameters, lr=0.1, momentum=0.5, nesterov=True, weight_decay=1e-4), model) == "SGD with momentum 0.5, weight_decay 0.0001, nesterov"
    two_rates = torch.optim.SGD([{"params": parameters[:1]}, {"params": parameters[1:], "lr": 0.01}], lr=0.1)
    assert _unlike_plain_sgd(two_rates, model) == "SGD with several learning rates"
    assert _unlike_plain_sgd(torch.optim.SGD(parameters, lr=0.1, maximize=True), model) == "SGD with maximize"
    assert _unlike_plain_sgd(torch.optim.AdamW(parameters), model) == "AdamW"
    assert _unlike_plain_sgd(torch.optim.SGD(parameters[1:], lr=0.1), model) == "SGD of some parameters ('weight' requires gradients but is in no parameter group)"


def test_adam_leaves_out_plain_sgd_quantities() -> None:
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 3), quantities(FIRST_ORDER), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    unavailable = run.instruments.unavailable
    assert set(unavailable) == {"CABS", "EarlyStopping"}
    for name in ("CABS", "EarlyStopping"):
        assert unavailable[name] == "defined for plain SGD only (no momentum, weight decay or Nesterov); this run uses Adam"
    others = [name for name in FIRST_ORDER if name not in unavailable]
    for step in range(3):
        assert set(run.records[step]) == set(others)
        check_first_order(run, step, names=others)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=LR, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.5, nesterov=True),
        lambda p: torch.optim.SGD([{"params": p[:2], "lr": 0.5}, {"params": p[2:]}], lr=LR),
    ],
    ids=["momentum", "weight_decay", "nesterov", "two_learning_rates"],
)
def test_other_sgd_variants_are_not_plain_sgd(make_optimizer: OptimizerFactory) -> None:
    model = ref.mlp(0)
    tracked = quantities(("CABS", "EarlyStopping", "GradNorm"))
    instruments = Instruments(model, nn.CrossEntropyLoss(), ref.cross_entropy_per_sample, make_optimizer(ref.trainable(model)), tracked)
    assert not instruments.plain_sgd
    assert set(instruments.unavailable) == {"CABS", "EarlyStopping"}
    assert [q.name for q in instruments.quantities] == ["GradNorm"]


def batchnorm_mlp(seed: int) -> nn.Sequential:
    """The reference mlp with a BatchNorm1d after the first layer (float64)."""
    model = ref.mlp(seed)
    return nn.Sequential(model[0], nn.BatchNorm1d(5).double(), *list(model)[1:])


def test_batchnorm_gives_no_per_sample_quantities() -> None:
    """(With the GGN: the Hessian of so small a model comes from products, see test_instruments_curvature.)"""
    run = train(batchnorm_mlp(0), make_batches("mlp", "ce", 0, 3), quantities(tuple(QUANTITIES)), curvature="ggn")
    instruments = run.instruments
    assert instruments.support.per_sample is None
    per_sample = {name for name, cls in QUANTITIES.items() if cls.per_sample}
    curvature = {name for name, cls in QUANTITIES.items() if cls.needs_curvature and not cls.per_sample}
    assert set(instruments.unavailable) == per_sample | curvature
    for name in per_sample:
        assert "layer '1' (BatchNorm1d)" in instruments.unavailable[name]
        assert "per-sample gradients do not exist" in instruments.unavailable[name]
    for name in curvature:
        assert instruments.unavailable[name] == "layer '1' (BatchNorm1d) has no curvature rule"
    kept = ("GradNorm", "Distance", "UpdateSize", "Loss", "LayerStats", "InputStats", "Activations")
    for step in range(3):
        assert {"GradNorm", "Distance", "UpdateSize", "Loss"} <= set(run.records[step])
        model = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        model.train()
        grads = ref.batch_gradient(model, loss_fn, inputs, targets)
        values = run.records[step]
        assert_close(values["GradNorm"], [float(g.norm()) for g in grads])
        assert_close(values["Distance"], ref.distance(run.thetas[step], run.thetas[0]))
        assert_close(values["UpdateSize"], ref.update_size(run.thetas[step + 1], run.thetas[step]))
        assert_close(values["Loss"], float(loss_fn(model(inputs), targets).detach()))
        assert set(values) == set(kept) | {"Time", "HessMaxEV"}


def frozen_batchnorm_model(kind: str, seed: int) -> nn.Sequential:
    """The reference mlp or cnn with a batch-norm layer after its first layer, in eval mode with
    running statistics of its own (a fine-tuned network whose normalisation is frozen)."""
    model = BUILDERS[kind](seed)
    norm = (nn.BatchNorm1d(5) if kind == "mlp" else nn.BatchNorm2d(model[0].out_channels)).double()
    generator = torch.Generator().manual_seed(seed)
    norm.running_mean.normal_(0.0, 0.5, generator=generator)
    norm.running_var.uniform_(0.5, 2.0, generator=generator)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.normal_(0.0, 0.1, generator=generator)
    return nn.Sequential(model[0], norm, *list(model)[1:]).eval()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_batchnorm_in_eval_mode_treats_every_sample_alone(kind: str) -> None:
    """With its running statistics, a batch-norm layer is a fixed affine map of each sample: the
    per-sample quantities exist and match the references (a model trained in eval mode)."""
    names = FIRST_ORDER
    run = train(frozen_batchnorm_model(kind, 0), make_batches(kind, "ce", 0, 3), quantities(names + ("Alpha",)))
    assert run.instruments.support.per_sample == "backpack" and run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, names=names)


def frozen_norm(channels: int, generator: torch.Generator) -> nn.BatchNorm2d:
    """A batch-norm layer with running statistics and parameters of its own (float64)."""
    norm = nn.BatchNorm2d(channels).double()
    norm.running_mean.normal_(0.0, 0.5, generator=generator)
    norm.running_var.uniform_(0.5, 2.0, generator=generator)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.normal_(0.0, 0.1, generator=generator)
    return norm


class FrozenResidual(nn.Module):
    """A residual network fine-tuned in eval mode as torchvision's ResNets are built: batch norm
    after each convolution, in-place ReLU, and the block's input added in place ([N, 2, 6, 6])."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.stem, self.stem_norm = nn.Conv2d(2, 3, 3, padding=1).double(), frozen_norm(3, generator)
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1, bias=False).double(), frozen_norm(3, generator)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 3).double()

    def forward(self, inputs: Tensor) -> Tensor:
        identity = self.relu(self.stem_norm(self.stem(inputs)))
        out = self.norm(self.conv(identity))
        out += identity
        return self.head(self.relu(out).mean((2, 3)))


def test_a_residual_network_with_frozen_batchnorm_and_in_place_operations() -> None:
    """Its batch-norm layers' per-sample gradients come from hooks on their outputs, as the
    convolutions' do: BackPACK's backward hooks hand a layer's output on as a view that the
    in-place sum and ReLU may not change (torch raised in the user's forward pass)."""
    model = FrozenResidual(0).eval()
    batches = make_batches("cnn", "ce", 0, 3)
    names = tuple(name for name in FIRST_ORDER if name != "Activations")  # (the reference reads outputs after the in-place ReLU)
    run = train(model, batches, quantities(names + ("Alpha",), **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.support.per_sample == "backpack" and run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, names=names)
        assert run.records[step]["Alpha"] == pytest.approx(curv.reference_alpha(run.reference_model(step), batches[step].per_sample_loss_fn, batches[step], batches[step + 1], run.thetas[step], run.thetas[step + 1]), rel=1e-6, abs=1e-8)


class Tokens(nn.Module):
    """Linear features of two positions per sample, each position layer-normalised ([N, 6] -> [N, 3])."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.norm, self.head = nn.Linear(6, 8).double(), nn.LayerNorm(4).double(), nn.Linear(8, 3).double()

    def forward(self, inputs: Tensor) -> Tensor:
        tokens = self.norm(self.embed(inputs).reshape(-1, 2, 4))
        return self.head(torch.relu(tokens).reshape(-1, 8))


NORMALIZED: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "layer norm of positions": ("mlp", Tokens),
    "layer norm of features": ("mlp", lambda seed: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()),
    "group norm": ("cnn", lambda seed: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 3)).double()),
    "RMS norm of positions": ("mlp", lambda seed: nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), nn.RMSNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()),
}


@pytest.mark.parametrize("name", list(NORMALIZED))
def test_layer_group_and_rms_norm_get_per_sample_gradients_from_hooks(name: str) -> None:
    """Layer, group and RMS norm treat every sample alone: their weights' per-sample gradients are
    delta_i times the normalised input summed over the positions (BackPACK has no rule for them;
    torch.func formed every per-sample gradient at once)."""
    kind, build = NORMALIZED[name]
    torch.manual_seed(0)
    model = build(0)
    with torch.no_grad():  # parameters of their own (a bias of zeros has no update ratio)
        for norm in (module for module in model.modules() if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))):
            norm.weight.uniform_(0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0.0, 0.1)
    batches = make_batches(kind, "ce", 0, 3)
    names = tuple(name for name in FIRST_ORDER if name != "Activations")  # (an in-place ReLU changes what the reference reads)
    run = train(model, batches, quantities(names + ("Alpha",), **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.support.per_sample == "backpack" and run.instruments.capture.factored and run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, names=names)
        assert run.records[step]["Alpha"] == pytest.approx(curv.reference_alpha(run.reference_model(step), batches[step].per_sample_loss_fn, batches[step], batches[step + 1], run.thetas[step], run.thetas[step + 1]), rel=1e-6, abs=1e-8)


def test_batchnorm_found_in_training_mode_at_a_step_switches_the_per_sample_quantities_off() -> None:
    """Attached in eval mode, then trained in training mode: the step at which the layer mixes
    the samples switches the per-sample quantities off, naming it; the others go on."""
    model = frozen_batchnorm_model("mlp", 0)
    batches = make_batches("mlp", "ce", 0, 4)
    opt = sgd(ref.trainable(model))
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(("NormTest", "Alpha", "GradNorm")))
    found = {}
    for step, batch in enumerate(batches):
        model.train(step >= 2)
        opt.zero_grad()
        outputs = model(batch.inputs)
        found.update(engine_step(instruments, opt, step, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets))
    found.update(instruments.finish())
    assert [set(found[step]) for step in range(4)] == [{"NormTest", "Alpha", "GradNorm"}, {"NormTest", "GradNorm"}] + [{"GradNorm"}] * 2  # step 1's Alpha ends at step 2
    assert set(instruments.unavailable) == {"NormTest", "Alpha"}
    assert instruments.unavailable["NormTest"].startswith("from step 2: layer '1' (BatchNorm1d) mixes the samples")


class Scale(nn.Module):
    """Elementwise learned scale: a layer with its own parameter that BackPACK has no rule for."""

    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, features, dtype=torch.float64))

    def forward(self, inputs: Tensor) -> Tensor:
        return inputs * self.scale


def scaled_mlp(seed: int) -> nn.Sequential:
    """The reference mlp with a :class:`Scale` after the first layer."""
    model = ref.mlp(seed)
    return nn.Sequential(model[0], Scale(5), *list(model)[1:])


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_unknown_layer_falls_back_to_torch_func(loss: str) -> None:
    model = scaled_mlp(0)
    batches = make_batches("mlp", loss, 0, 2)
    options = histogram_options(model, batches[0], DECAY)
    run = train(model, batches, quantities(FIRST_ORDER + ("HessTrace", "TICDiag", "TICTrace"), **options), weight_decay=DECAY, curvature="ggn")
    instruments = run.instruments
    assert instruments.support.per_sample == "functorch"
    assert instruments.support.per_sample_reason == "layer '1' (Scale) has no BackPACK rule; per-sample gradients use torch.func (exact, slower)"
    assert instruments.unavailable == {}  # its curvature by autograd (test_instruments_curvature)
    for step in range(2):
        check_first_order(run, step, weight_decay=DECAY)


class Attending(nn.Module):
    """Self-attention over a short sequence, then a linear head (float32: CPU attention then runs a
    kernel that ``vmap`` has no batching rule for)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.attention(inputs, inputs, inputs, need_weights=False)[0].mean(1))


def test_per_sample_gradients_through_attention_from_torch_func_are_exact_and_quiet() -> None:
    import warnings

    from cockpit_cli.instruments.functional_passes import functorch_per_sample

    model, loss = Attending(), nn.CrossEntropyLoss(reduction="none")
    inputs, targets = torch.randn(4, 5, 8), torch.tensor([0, 2, 1, 2])
    params = {name: p.detach() for name, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_sample = functorch_per_sample(model, params, loss, inputs, targets, None)
    assert not [w for w in caught if "performance drop" in str(w.message)]  # torch's note on vmap's speed is not the user's business
    for i in range(len(inputs)):
        expected = torch.autograd.grad(loss(model(inputs[i : i + 1]), targets[i : i + 1]).sum(), list(model.parameters()))
        for (name, got), want in zip(per_sample.items(), expected):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6, msg=name)


class Recurrent(nn.Module):
    """A GRU over a short sequence and a linear head on its last state: BackPACK has no GRU rule,
    and ``vmap`` cannot run ``nn.GRU`` a sample at a time (its hidden state starts unbatched and
    is changed in place)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(4, 5, batch_first=True).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.gru(inputs)[0][:, -1])


def test_the_batch_jacobian_in_chunks_of_rows_is_every_sample_s_gradient() -> None:
    from cockpit_cli.instruments.functional_passes import JACOBIAN_ROWS, functorch_per_sample

    model, loss = Recurrent(), nn.CrossEntropyLoss(reduction="none")
    samples = 2 * JACOBIAN_ROWS + 3  # two full chunks and a part
    inputs, targets = torch.randn(samples, 6, 4, dtype=torch.float64), torch.randint(0, 3, (samples,))
    params = {name: p.detach() for name, p in model.named_parameters()}
    per_sample = functorch_per_sample(model, params, loss, inputs, targets, None, by_jacobian=True)
    for i in range(samples):
        expected = torch.autograd.grad(loss(model(inputs[i : i + 1]), targets[i : i + 1]).sum(), list(model.parameters()))
        for (name, got), want in zip(per_sample.items(), expected):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12, msg=name)


def make_batches_of_sequences(steps: int) -> list[ref.Batch]:
    """``steps`` batches of N sequences ``[N, 6, 4]`` for :class:`Recurrent`, with class targets."""
    generator = torch.Generator().manual_seed(3)
    return [
        ref.Batch(torch.randn(N, 6, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (N,), generator=generator), nn.CrossEntropyLoss(), ref.cross_entropy_per_sample)
        for _ in range(steps)
    ]


def test_a_model_vmap_cannot_run_gets_per_sample_gradients_from_the_batch_jacobian() -> None:
    batches = make_batches_of_sequences(3)
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "GradHist1d", "LayerStats")
    model = Recurrent()
    run = train(model, batches, quantities(names, **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.support.per_sample == "functorch"
    assert "NormTest" not in run.instruments.unavailable
    assert run.instruments.changes == [f"from step 0: {JACOBIAN_REASON}"]  # said once, in the run's warnings
    for step in range(3):
        check_first_order(run, step, names=names)


class RecurrentWithSpare(Recurrent):
    """:class:`Recurrent` with a layer its forward pass never calls: torch.func gives that
    layer's parameters one zero gradient broadcast to every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(2, 2).double()


def test_a_layer_the_forward_pass_skips_takes_the_regulariser_s_gradient_per_sample() -> None:
    """Adding the regulariser's gradient to the broadcast zeros in place raised and stopped the training."""
    batches = make_batches_of_sequences(3)
    names = ("GradNorm", "NormTest", "InnerTest", "MeanGSNR", "LayerStats")
    run = train(RecurrentWithSpare(), batches, quantities(names), weight_decay=DECAY)
    assert run.instruments.support.per_sample == "functorch" and run.instruments.unavailable == {}
    for step in range(3):
        check_first_order(run, step, weight_decay=DECAY, names=names)


def test_a_failure_reducing_torch_func_s_gradients_switches_their_quantities_off_not_the_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.instruments import backend

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("broken reduction")

    monkeypatch.setattr(backend, "reduce_layer", broken)
    batches = make_batches_of_sequences(2)
    model = Recurrent()
    run = train(model, batches, quantities(("GradNorm", "NormTest")))
    assert run.instruments.unavailable == {"NormTest": "failed at step 0 and was switched off: per-sample statistics: RuntimeError: broken reduction"}
    plain = train(Recurrent(), batches, None)
    for trained, expected in zip(run.thetas[-1], plain.thetas[-1]):
        torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    for step in range(2):
        check_first_order(run, step, names=("GradNorm",))


class LastState(nn.Module):
    """A recurrent layer's output sequence ``[N, T, H]`` (first of its outputs) to its last state ``[N, H]``."""

    def forward(self, outputs: tuple[Tensor, Any]) -> Tensor:
        return outputs[0][:, -1]


def token_batches(steps: int) -> list[ref.Batch]:
    """``steps`` batches of N sequences of 4 token ids below 6 (id 0 among them), with class targets."""
    generator = torch.Generator().manual_seed(5)
    return [ref.Batch(torch.randint(0, 6, (N, 4), generator=generator), torch.randint(0, 3, (N,), generator=generator), *ref.loss_functions("ce")) for _ in range(steps)]


def test_an_embedding_beside_backpack_s_recurrent_rules_gets_exact_per_sample_gradients() -> None:
    """BackPACK's own Embedding rule failed in float64 and with a padding index, which switched every per-sample quantity off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.LSTM(3, 4, batch_first=True), LastState(), nn.Linear(4, 3)).double()
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "LayerStats")
    run = train(model, token_batches(3), quantities(names), weight_decay=DECAY)
    assert run.instruments.support.per_sample == "backpack" and run.instruments.unavailable == {}
    for step in range(3):
        check_first_order(run, step, weight_decay=DECAY, names=names)


@pytest.mark.parametrize(
    ("layers", "setting"),
    [
        (lambda: [nn.Embedding(6, 3), nn.LSTM(3, 4, num_layers=2, batch_first=True), LastState()], "(LSTM) has settings BackPACK's rule does not cover (only num_layers = 1 is supported)"),
        (lambda: [nn.Embedding(6, 4), nn.RNN(4, 4, nonlinearity="relu", batch_first=True), LastState()], "(RNN) has settings BackPACK's rule does not cover (only nonlinearity = tanh is supported)"),
        (lambda: [nn.Embedding(6, 1, max_norm=1.0), nn.Flatten()], "(Embedding) has settings BackPACK's rule does not cover (Only max_norm=None supported.)"),
    ],
    ids=["lstm-two-layers", "rnn-relu", "embedding-max-norm"],
)
def test_a_layer_with_settings_backpack_s_rule_does_not_cover_gets_per_sample_gradients_from_torch_func(layers: Callable[[], list[nn.Module]], setting: str) -> None:
    """BackPACK's rule raised inside the backward pass, which switched every per-sample quantity off at step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers(), nn.Linear(4, 3)).double()
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "LayerStats")
    run = train(model, token_batches(3), quantities(names))
    assert run.instruments.support.per_sample == "functorch" and run.instruments.unavailable == {}
    assert setting in run.instruments.support.per_sample_reason
    for step in range(3):
        check_first_order(run, step, names=names if model[0].max_norm is None else names[:-1])  # (max_norm renormalises the weights the step starts from)


def test_an_embedding_that_scales_its_gradient_by_id_counts_has_no_per_sample_quantities() -> None:
    """Each id's gradient divided by its count in the batch is no mean of per-sample gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 2, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(8, 3)).double()
    batches = token_batches(2)
    run = train(model, batches, quantities(("GradNorm", "NormTest", "MeanGSNR")))
    reason = run.instruments.unavailable["NormTest"]
    assert run.instruments.support.per_sample is None and set(run.instruments.unavailable) == {"NormTest", "MeanGSNR"}
    assert "layer '0' (Embedding) scales its gradient by how often each id occurs in the batch (scale_grad_by_freq)" in reason
    for step in range(2):
        inputs, targets, loss_fn, _ = batches[step]
        expected = ref.batch_gradient(run.reference_model(step), loss_fn, inputs, targets)
        assert_close(run.records[step]["GradNorm"], [float(g.norm()) for g in expected])


def parametrized_mlp(kind: str) -> nn.Sequential:
    """The reference mlp with its first layer's weight parametrized (``weight_norm``,
    ``spectral_norm``): the layer holds its parameters beside the parametrization's modules."""
    model = ref.mlp(0)
    model[0] = getattr(nn.utils.parametrizations, kind)(model[0])
    return model


def test_a_weight_norm_layer_gets_per_sample_quantities_from_torch_func() -> None:
    """BackPACK's curvature rules crashed on the parametrized layer, which switched off every
    quantity; its rules see only the layer's sublayers (the curvature follows the layer whole,
    through BackPACK's graph: test_instruments_curvature)."""
    model = parametrized_mlp("weight_norm")
    batches = make_batches("mlp", "ce", 0, 2)
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "GradHist1d", "LayerStats")
    run = train(model, batches, quantities(names + ("HessTrace",), **histogram_options(model, batches[0], 0.0)), curvature="ggn")
    assert run.instruments.support.per_sample == "functorch"
    assert run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step, names=names)


@pytest.mark.parametrize("curvature", [None, "ggn", "hessian"])
def test_a_spectral_norm_layer_is_measured_as_trained_and_its_power_iteration_left_alone(curvature: str | None) -> None:
    """The instruments' own passes compute with the vectors the training's forward pass left
    (a further power iteration would measure other weights and move the training's state on),
    also the curvature's pass through the graph, whose rules compute the layer again (they moved
    the vectors on, and torch.func's per-sample gradients then measured other weights)."""
    model = parametrized_mlp("spectral_norm")
    spectral = model[0].parametrizations.weight[0]
    loss_fn, per_sample = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none")
    opt = sgd(ref.trainable(model))
    names = ("NormTest", "InnerTest", "GradNorm") + (("HessTrace",) if curvature else ())
    instruments = Instruments(model, loss_fn, per_sample, opt, quantities(names), curvature=curvature or "hessian")
    for step, (inputs, targets, *_) in enumerate(make_batches("mlp", "ce", 0, 2)):
        opt.zero_grad()
        outputs = model(inputs)  # one power iteration, as training takes it
        as_trained = copy.deepcopy(model).eval()  # the same vectors, held still
        vectors = (spectral._u.clone(), spectral._v.clone())
        values = engine_step(instruments, opt, step, loss_fn(outputs, targets), inputs, outputs, targets)
        assert torch.equal(spectral._u, vectors[0]) and torch.equal(spectral._v, vectors[1])
        grads = ref.per_sample_gradients(as_trained, per_sample, inputs, targets)
        assert instruments.unavailable == {}
        assert_close(values[step]["NormTest"], ref.norm_test(grads))
        assert_close(values[step]["InnerTest"], ref.inner_test(grads))
        if curvature is not None:
            diagonal = (curv.ggn_diagonal if curvature == "ggn" else curv.hessian_diagonal)(as_trained, loss_fn, inputs, targets)
            assert_close(values[step]["HessTrace"], curv.hess_trace(diagonal), rel=1e-9, abs=1e-12)


def test_the_instruments_own_passes_give_changed_buffers_their_values_back() -> None:
    """Batch norm in training mode moves its running statistics at every forward pass; a pass of
    the instruments (here the loss again, as for a compiled model's Hessian-vector products)
    leaves them as training left them, and the pass's graph can still be differentiated."""
    from cockpit_cli.instruments.functional_passes import loss_at

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    inputs, targets = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    model(inputs)
    running = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    loss = loss_at(model, nn.CrossEntropyLoss(), inputs, targets, None)
    assert torch.equal(model[1].running_mean, running[0]) and torch.equal(model[1].running_var, running[1]) and int(model[1].num_batches_tracked) == running[2]
    loss.backward()  # the graph saved the tensors the pass used
    assert all(p.grad is not None for p in model.parameters())


class Shifted(nn.Module):
    """The reference mlp plus a learned shift of its outputs: a parameter of the container
    itself (which BackPACK's layer rules never see), in a model that is no nn.Sequential."""

    def __init__(self, seed: int):
        super().__init__()
        self.layers = ref.mlp(seed)
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, ref.NUM_OUTPUTS, dtype=torch.float64))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs) + self.shift


def test_a_parameter_of_a_container_falls_back_to_torch_func() -> None:
    model = Shifted(0)
    batches = make_batches("mlp", "ce", 0, 2)
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "GradHist1d")
    run = train(model, batches, quantities(names + ("HessTrace",), **histogram_options(model, batches[0], 0.0)), curvature="ggn")
    support = run.instruments.support
    assert support.per_sample == "functorch"
    assert support.per_sample_reason == (
        "layer 'Shifted' (Shifted) has parameters beside its sublayers, which BackPACK's rules cannot follow; per-sample gradients use torch.func (exact, slower)"
    )
    assert run.instruments.unavailable == {}  # (the shift's sum a layer of the curvature's graph, which holds it)
    for step in range(2):
        check_first_order(run, step, names=names)
        inputs, targets, loss_fn, _ = run.batches[step]
        assert_close(run.records[step]["HessTrace"], curv.hess_trace(curv.ggn_diagonal(run.reference_model(step), loss_fn, inputs, targets)), rel=1e-9, abs=1e-12)


def test_the_reason_for_torch_func_names_the_layer_that_holds_parameters_beside_its_sublayers() -> None:
    """It named the whole model, whose own layers all have rules (attention inside a transformer block, say)."""
    from cockpit_cli.instruments.support import check_support

    model = nn.Sequential(nn.Linear(6, 6), Shifted(0))
    assert check_support(model, nn.CrossEntropyLoss()).per_sample_reason == (
        "layer '1' (Shifted) has parameters beside its sublayers, which BackPACK's rules cannot follow; per-sample gradients use torch.func (exact, slower)"
    )


class Standardize(nn.Module):
    """Fixed input scaling without parameters, a layer BackPACK has no rule for."""

    def forward(self, inputs: Tensor) -> Tensor:
        return (inputs - 0.25) * 2.0


def test_layers_before_the_first_parameter_need_no_curvature_rule() -> None:
    """Nothing is backpropagated through a layer before the first parameter: a layer there that
    BackPACK has no curvature rule for leaves the curvature diagonal possible, and exact."""
    model = nn.Sequential(Standardize(), *ref.mlp(0))
    run = train(model, make_batches("mlp", "ce", 0, 1), quantities(("HessTrace",)))
    assert run.instruments.unavailable == {}
    inputs, targets, loss_fn, _ = run.batches[0]
    diagonal = curv.hessian_diagonal(run.reference_model(0), loss_fn, inputs, targets, None, 0.0)
    assert_close(run.records[0]["HessTrace"], curv.hess_trace(diagonal))


class Broken(Quantity):
    """A quantity whose computation fails at its second tracked step."""

    name = "Broken"

    def compute(self, data: Any) -> None:
        if data.step >= 1:
            raise RuntimeError("boom")
        data.emit(self.name, 1.0)


def test_a_failing_quantity_is_switched_off_and_training_goes_on() -> None:
    batches = make_batches("mlp", "ce", 0, 4)
    run = train(ref.mlp(0), batches, [Broken(Schedule()), *quantities(("GradNorm", "Loss"))])
    assert run.instruments.unavailable == {"Broken": "failed at step 1 and was switched off: RuntimeError: boom"}
    assert run.records[0]["Broken"] == 1.0
    assert [sorted(run.records[s]) for s in range(4)] == [["Broken", "GradNorm", "Loss"]] + [["GradNorm", "Loss"]] * 3
    plain = train(ref.mlp(0), batches, None)
    assert all(torch.equal(a, b) for a, b in zip(run.thetas[-1], plain.thetas[-1]))


@pytest.mark.parametrize("through", ["sample_statistics", "layer_products"])
def test_a_failing_reduction_switches_off_what_reads_it(through: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reduction that fails for one parameter leaves the others' parts, whose sum is not the
    network's: the quantities that read it are switched off with the error (never given a partial
    sum), the others go on, and training is unchanged. Through the per-parameter statistics (the
    second parameter at step 1) and through a layer's products at Alpha's second point alone (step 3)."""
    from cockpit_cli.instruments import backend, sample_pass

    original = getattr(sample_pass if through == "sample_statistics" else backend, through)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Tensor:
        calls["n"] += 1
        # step 1's second parameter; or step 3's second layer (after step 1's three)
        if calls["n"] == (len(ref.trainable(ref.mlp(0))) + 2 if through == "sample_statistics" else 3 + 2):
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_pass if through == "sample_statistics" else backend, through, failing)
    batches = make_batches("mlp", "ce", 0, 5)
    names = ("NormTest", "GradHist1d", "GradNorm", "Loss") if through == "sample_statistics" else ()
    tracked = quantities(names) + [quantities(("Alpha",), Schedule(every=2))[0]]
    run = train(ref.mlp(0), batches, tracked)
    failed_step = 1 if through == "sample_statistics" else 3
    expected_off = {"NormTest", "GradHist1d", "Alpha"} if through == "sample_statistics" else {"Alpha"}
    assert run.instruments.unavailable == {name: f"failed at step {failed_step} and was switched off: per-sample statistics: RuntimeError: boom" for name in expected_off}
    for step in range(failed_step, 5):
        assert not set(run.records.get(step, {})) & expected_off
    assert [set(run.records.get(step, {})) >= {"GradNorm", "Loss"} for step in range(5)] == [bool(names)] * 5
    if through == "layer_products":
        assert sorted(run.records) == [0]  # step 2's Alpha would have ended at step 3
    plain = train(ref.mlp(0), batches, None)
    assert all(torch.equal(a, b) for a, b in zip(run.thetas[-1], plain.thetas[-1]))


def test_a_backpack_rule_that_raises_inside_the_backward_pass_switches_off_what_it_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BackPACK rule raising inside the backward pass stopped the pass, and the training with
    it: the pass now completes (training is unchanged), and the per-sample and curvature
    quantities, which read the rules, are switched off with the layer and the error."""
    from cockpit_cli.instruments import backend

    original = backend.hook_run_extensions

    def failing(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if isinstance(module, nn.Conv2d):
            raise RuntimeError("boom")
        original(module, grad_input, grad_output)

    monkeypatch.setattr(backend, "hook_run_extensions", failing)
    batches = make_batches("cnn", "ce", 0, 3)
    model = ref.cnn(0)
    run = train(model, batches, quantities(("HessTrace", "NormTest", "GradHist1d", "GradNorm", "Loss")))
    # what the failed rule would have dropped is gone: the model holds no stored tensors and can be copied
    assert not [name for name, module in model.named_modules() if hasattr(module, "input0") or hasattr(module, "output")]
    assert not [p for p in model.parameters() if hasattr(p, "grad_batch") or hasattr(p, "diag_h")]
    copy.deepcopy(model)
    reason = "failed at step 0 and was switched off: BackPACK's rule of layer '0' (Conv2d) failed: RuntimeError: boom"
    assert run.instruments.unavailable == {name: reason for name in ("HessTrace", "NormTest", "GradHist1d")}
    assert [sorted(run.records[step]) for step in range(3)] == [["GradNorm", "Loss"]] * 3
    check_first_order(run, 0, names=("GradNorm", "Loss"))
    plain = train(ref.cnn(0), batches, None)
    assert all(torch.equal(a, b) for a, b in zip(run.thetas[-1], plain.thetas[-1]))


def test_frozen_parameters_are_left_out() -> None:
    model = ref.mlp(0)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    batches = make_batches("mlp", "mse", 0, 2)
    options = histogram_options(model, batches[0], DECAY)
    run = train(model, batches, quantities(FIRST_ORDER + ("HessTrace",), **options), weight_decay=DECAY)
    assert run.instruments.names == ["0.bias", "2.weight", "4.weight", "4.bias"]
    for step in range(2):
        check_first_order(run, step, weight_decay=DECAY)
        model = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        diagonal = curv.hessian_diagonal(model, loss_fn, inputs, targets, ref.weights(model), DECAY)
        assert len(diagonal) == 4
        assert_close(run.records[step]["HessTrace"], curv.hess_trace(diagonal))


# --- the engine does not change training ----------------------------------------------------------


def dropout_mlp(seed: int) -> nn.Sequential:
    """The reference mlp with Dropout(0.3) after the first activation (float64, train mode)."""
    model = ref.mlp(seed)
    return nn.Sequential(model[0], model[1], nn.Dropout(0.3), *list(model)[2:])


def scaled_dropout_mlp(seed: int) -> nn.Sequential:
    """``dropout_mlp`` followed by a :class:`Scale`: dropout on the torch.func path."""
    return nn.Sequential(*dropout_mlp(seed), Scale(3))


MODELS: dict[str, Callable[[int], nn.Module]] = {"mlp": ref.mlp, "cnn": ref.cnn, "dropout": dropout_mlp, "scaled_dropout": scaled_dropout_mlp}


@pytest.mark.parametrize("preset", ["economy", "full"])
@pytest.mark.parametrize(
    "kind, make_optimizer",
    [
        ("cnn", sgd),
        ("dropout", sgd),
        ("dropout", lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)),
        ("scaled_dropout", lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)),
        ("mlp", lambda p: torch.optim.Adam(p, lr=0.01)),
    ],
    ids=["cnn-sgd", "dropout-sgd", "dropout-momentum", "functorch-dropout-momentum", "mlp-adam"],
)
def test_training_is_unchanged(preset: str, kind: str, make_optimizer: OptimizerFactory) -> None:
    """Parameters (and the random state) after k steps equal those of plain training with the same seed."""
    batches = make_batches("cnn" if kind == "cnn" else "mlp", "ce", 0, 4)
    config = parse_config({"instruments": {"preset": preset}}, source="c.yaml")
    decay = DECAY if kind == "cnn" else 0.0
    torch.manual_seed(7)
    tracked = train(MODELS[kind](0), batches, build_quantities(config, len(batches)), make_optimizer, weight_decay=decay)
    tracked_state = torch.get_rng_state()
    torch.manual_seed(7)
    plain = train(MODELS[kind](0), batches, None, make_optimizer, weight_decay=decay)
    for step in range(len(batches) + 1):
        for a, b in zip(tracked.thetas[step], plain.thetas[step]):
            assert torch.equal(a, b)
    assert torch.equal(tracked_state, torch.get_rng_state())
    assert set(tracked.records[0]) >= set(PRESETS[preset]) - set(tracked.instruments.unavailable)


# --- settings --------------------------------------------------------------------------------------


def build(instruments: dict[str, Any], total_steps: int = 100) -> list[Quantity]:
    """``build_quantities`` of a config with this ``instruments`` section."""
    return build_quantities(parse_config({"instruments": instruments}, source="c.yaml"), total_steps)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset: str) -> None:
    built = build({"preset": preset, "every": 2, "offset": 1})
    assert [q.name for q in built] == list(PRESETS[preset])
    assert all([s for s in range(8) if q.schedule(s)] == [1, 3, 5, 7] for q in built)


def test_presets_are_the_published_sets_with_the_diagnostics() -> None:
    economy = ("Alpha", "Distance", "GradHist1d", "GradNorm", "InnerTest", "Loss", "NormTest", "OrthoTest", "UpdateSize")
    diagnostics = ("LayerStats", "Activations", "InputStats")
    assert PRESETS == {
        "none": (),
        "economy": economy + diagnostics,
        "business": economy + ("TICDiag", "HessTrace") + diagnostics,
        "full": economy + ("TICDiag", "HessTrace", "HessMaxEV", "GradHist2d") + diagnostics,
    }


def test_overrides() -> None:
    overrides = {"HessMaxEV": {"every": 5}, "TICDiag": False, "GradHist1d": {"bins": 10, "range": [-1, 1]}, "MeanGSNR": True}
    built = {q.name: q for q in build({"preset": "business", "every": 2, "quantities": overrides})}
    assert "TICDiag" not in built and "MeanGSNR" in built and "HessMaxEV" in built
    assert set(built) == (set(PRESETS["business"]) - {"TICDiag"}) | {"HessMaxEV", "MeanGSNR"}
    assert [s for s in range(12) if built["HessMaxEV"].schedule(s)] == [0, 5, 10]
    assert [s for s in range(6) if built["GradNorm"].schedule(s)] == [0, 2, 4]
    assert built["GradHist1d"].spec == HistogramSpec(10, -1.0, 1.0)
    assert built["GradHist1d"].options == {"bins": 10, "range": (-1.0, 1.0), "adaptive": False}
    hist2d = {q.name: q for q in build({"preset": "none", "quantities": {"GradHist2d": {"bins": [3, 4], "range": [[-1, 1], [-0.5, 0.5]]}}})}["GradHist2d"]
    assert hist2d.specs == (HistogramSpec(3, -1.0, 1.0), HistogramSpec(4, -0.5, 0.5))


def test_log_spacing_settings() -> None:
    overrides = {"HessMaxEV": {"every": 5}, "Loss": {"points": 3}}
    built = {q.name: q for q in build({"preset": "economy", "spacing": "log", "points": 5, "quantities": overrides}, total_steps=21)}
    assert [s for s in range(21) if built["GradNorm"].schedule(s)] == [0, 1, 4, 9, 20]
    assert [s for s in range(21) if built["Loss"].schedule(s)] == [0, 4, 20]
    assert [s for s in range(21) if built["HessMaxEV"].schedule(s)] == [0, 5, 10, 15, 20]  # every: linear spacing
    built = {q.name: q for q in build({"preset": "economy", "every": 2, "quantities": {"Loss": {"points": 3}}}, total_steps=21)}
    assert [s for s in range(21) if built["Loss"].schedule(s)] == [0, 4, 20]  # points: log spacing
    built = {q.name: q for q in build({"preset": "economy", "spacing": "log", "points": 5, "quantities": {"Loss": {"offset": 3}}}, total_steps=21)}
    assert [s for s in range(21) if built["Loss"].schedule(s)] == list(range(3, 21))  # offset: linear spacing


KNOWN = "known: " + ", ".join(sorted(QUANTITIES))


@pytest.mark.parametrize(
    "entries, message, hint",
    [
        ({"GradNrom": True}, "c.yaml: instruments.quantities.GradNrom: quantity 'GradNrom' is unknown; did you mean 'GradNorm'?", KNOWN),
        ({"Nothing": True}, "c.yaml: instruments.quantities.Nothing: quantity 'Nothing' is unknown", KNOWN),
        (
            {"GradHist1d": {"bin": 10}},
            "c.yaml: instruments.quantities.GradHist1d.bin: GradHist1d has no setting 'bin'; did you mean 'bins'?",
            "its settings: every, offset, spacing, points, bins, range, adaptive",
        ),
        ({"GradNorm": {"color": 1}}, "c.yaml: instruments.quantities.GradNorm.color: GradNorm has no setting 'color'", "its settings: every, offset, spacing, points"),
        ({"GradHist1d": {"bins": "ten"}}, "c.yaml: instruments.quantities.GradHist1d.bins: expected an integer, got 'ten'", None),
        ({"GradHist1d": {"bins": 0}}, "c.yaml: instruments.quantities.GradHist1d.bins: expected a value >= 1, got 0", None),
        ({"GradHist1d": {"range": [1]}}, "c.yaml: instruments.quantities.GradHist1d.range: expected 2 values, got 1", None),
        ({"GradHist1d": {"range": ["a", 1]}}, "c.yaml: instruments.quantities.GradHist1d.range: expected a number, got 'a'", None),
        ({"GradHist1d": {"adaptive": "yes"}}, "c.yaml: instruments.quantities.GradHist1d.adaptive: expected true or false, got 'yes'", None),
        ({"HessMaxEV": {"every": 0}}, "c.yaml: instruments.quantities.HessMaxEV.every: expected a value >= 1, got 0", None),
        ({"HessMaxEV": {"rtol": "small"}}, "c.yaml: instruments.quantities.HessMaxEV.rtol: expected a number, got 'small'", None),
        ({"HessMaxEV": {"spacing": "cubic"}}, "c.yaml: instruments.quantities.HessMaxEV.spacing: expected 'linear' or 'log', got 'cubic'", None),
        ({"GradNorm": 3}, "c.yaml: instruments.quantities.GradNorm: expected true, false or a mapping of settings, got 3", None),
        ({"GradHist1d": {"bins": 10_001}}, "c.yaml: instruments.quantities.GradHist1d.bins: expected a value <= 10000, got 10001", None),
        ({"GradHist2d": {"bins": [40, 1001]}}, "c.yaml: instruments.quantities.GradHist2d.bins: expected a value <= 1000, got 1001", None),
        ({"HessMaxEV": {"rtol": -0.1}}, "c.yaml: instruments.quantities.HessMaxEV.rtol: expected a value >= 0, got -0.1", None),
        ({"HessMaxEV": {"atol": -1e-6}}, "c.yaml: instruments.quantities.HessMaxEV.atol: expected a value >= 0, got -1e-06", None),
        (
            {"GradHist1d": {"range": [1, 1]}},
            "c.yaml: instruments.quantities.GradHist1d.range: expected a range [low, high] of finite numbers with low < high, got [1, 1]",
            None,
        ),
        (
            {"GradHist1d": {"range": [float("-inf"), 1]}},
            "c.yaml: instruments.quantities.GradHist1d.range: expected a range [low, high] of finite numbers with low < high, got [-inf, 1]",
            None,
        ),
        (
            {"GradHist2d": {"range": [[-1, 1], [0.5, -0.5]]}},
            "c.yaml: instruments.quantities.GradHist2d.range: expected a range [low, high] of finite numbers with low < high, got [0.5, -0.5]",
            None,
        ),
    ],
)
def test_bad_entries(entries: dict[str, Any], message: str, hint: str | None) -> None:
    with pytest.raises(CockpitError) as error:
        build({"preset": "none", "quantities": entries})
    assert error.value.message == message
    assert error.value.hint == hint


@pytest.mark.parametrize("kind", ["linear3d", "conv1d", "conv2d"])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 1])
def test_factored_weight_gradients_match_backpack(kind: str, chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of the factored per-sample gradients (and their mean) equal BackPACK's ``grad_batch``."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from torch import nn

    from cockpit_cli.instruments import row_blocks
    from cockpit_cli.instruments.factored_batch_grad import factored_batch_grad
    from cockpit_cli.instruments.factored_gradients import FactoredSamples

    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", chunk_elements)  # 1: one sample per block
    torch.manual_seed(0)
    if kind == "conv2d":
        net = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2, stride=2), nn.ReLU(), nn.Conv2d(4, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        inputs = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    elif kind == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2, stride=2), nn.ReLU(), nn.Conv1d(4, 3, 3, dilation=2), nn.Flatten(), nn.Linear(3 * 16, 3))
        inputs = torch.randn(5, 2, 40, dtype=torch.float64)
    else:  # a Linear layer applied at every position of a sequence
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(7 * 6, 3))
        inputs = torch.randn(5, 7, 4, dtype=torch.float64)
    net = extend(net.double())
    loss_fn = extend(nn.CrossEntropyLoss())
    targets = torch.randint(0, 3, (5,))
    decay = 0.3
    results = []
    for extension in (BatchGrad(), factored_batch_grad()):
        net.zero_grad()
        gradients = []
        with backpack(extension, extension_hook=lambda module: gradients.extend(_collect(module, decay))):
            loss_fn(net(inputs), targets).backward()
        results.append(gradients)
    factored = [type(samples).__name__ for samples, _ in results[1] if isinstance(samples, FactoredSamples)]
    assert factored == (["FactoredLinear"] * 2 if kind == "linear3d" else ["FactoredLinear", "FactoredConv", "FactoredConv"])
    for (ours, our_mean), (theirs, their_mean) in zip(results[1], results[0]):
        assert torch.allclose(our_mean, their_mean, rtol=1e-10, atol=1e-12)
        if isinstance(ours, FactoredSamples):
            assert torch.allclose(torch.cat(list(ours.blocks())), theirs, rtol=1e-10, atol=1e-12)
            vector = torch.randn(theirs.shape[1], dtype=torch.float64)
            assert torch.allclose(ours.products(vector), theirs @ vector, rtol=1e-10, atol=1e-12)
            square_norms = ours.square_norms()  # a closed form for one position per sample, else None
            assert (square_norms is None) == (ours.delta.shape[2] > 1)
            if square_norms is not None:
                assert torch.allclose(square_norms, theirs.square().sum(1), rtol=1e-10, atol=1e-12)


def _collect(module: nn.Module, decay: float) -> list[tuple[Any, Tensor]]:
    """Per-sample gradients of a module's parameters (regularised, times N) and their means."""
    from cockpit_cli.instruments.factored_gradients import FactoredSamples

    found = []
    for param in module.parameters(recurse=False):
        samples = param.__dict__.pop("grad_batch")
        if isinstance(samples, FactoredSamples):
            samples.regularized(param, decay)
            found.append((samples, samples.mean()))
        else:
            dense = (samples * samples.shape[0] + decay * param.detach()).reshape(samples.shape[0], -1)
            found.append((dense, dense.mean(0)))
    return found


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
def test_products_with_the_mean_of_a_wide_layer_come_from_gram_matrices(weight_decay: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear(40, 48) with 8 samples: the products with the layer's own mean gradient (InnerTest,
    OrthoTest) are taken from the samples' [8, 8] Gram matrices, and match the references; with
    weight decay the mean is not the data gradient, and the layer's matrix product is taken."""
    gram_layers: list[tuple[int, int]] = []
    original = factored_gradients.FactoredLinear._gram_pays

    def spying(self: factored_gradients.FactoredLinear, vector: Tensor) -> bool:
        pays = original(self, vector)
        if pays:
            gram_layers.append(tuple(self.weight_shape))
        return pays

    monkeypatch.setattr(factored_gradients.FactoredLinear, "_gram_pays", spying)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 3)).double()
    batches = []
    for step in range(2):
        gen = torch.Generator().manual_seed(50 + step)
        batches.append(ref.Batch(torch.randn(N, 40, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen), *ref.loss_functions("ce")))
    names = ("GradNorm", "NormTest", "InnerTest", "OrthoTest")
    run = train(model, batches, quantities(names), weight_decay=weight_decay)
    assert run.instruments.unavailable == {}
    assert set(gram_layers) == (set() if weight_decay else {(48, 40)})
    for step in range(2):
        check_first_order(run, step, weight_decay=weight_decay, names=names)


def test_products_with_the_own_mean_of_a_layer_at_several_positions_equal_those_of_formed_gradients() -> None:
    """Linear(40, 48) applied at 3 positions of each of 8 samples: the Gram matrices of the
    samples' factors hold for one position only, and the products with the layer's own mean
    gradient equal those of the formed per-sample gradients."""
    gen = torch.Generator().manual_seed(4)
    inputs, delta = torch.randn(N, 3, 40, generator=gen, dtype=torch.float64), torch.randn(N, 3, 48, generator=gen, dtype=torch.float64)
    source = factored_gradients.FactoredLinear(inputs, delta, torch.Size([48, 40]))
    formed = torch.cat(list(source.blocks()))
    mean = source.mean()
    torch.testing.assert_close(mean, formed.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(source.products(mean), formed @ mean, rtol=1e-12, atol=1e-12)


def test_a_batch_of_one_sample_or_a_zero_gradient_leaves_the_gradient_tests_out_for_that_step() -> None:
    """The tests divide a spread by N (N - 1) ||g||^2 and EB needs a variance: a last batch of one
    sample (a loader that keeps it) or a gradient of zero gives them no value at that step, and
    they go on at the next (they were switched off for the rest of the run, or were inf)."""
    names = ("NormTest", "InnerTest", "OrthoTest", "EarlyStopping", "GradNorm")
    batches = make_batches("mlp", "ce", 0, 3)
    batches[1] = batches[1]._replace(inputs=batches[1].inputs[:1], targets=batches[1].targets[:1])
    run = train(ref.mlp(0), batches, quantities(names))
    assert run.instruments.unavailable == {}
    assert set(run.records[1]) == {"GradNorm"}
    for step in (0, 2):
        check_first_order(run, step, names=names)

    fitted = ref.mlp(0)
    with torch.no_grad():
        fitted[-1].weight.zero_()
        fitted[-1].bias.zero_()  # outputs 0 for every input: the squared loss of zero targets is at its minimum
    exact = [batch._replace(targets=torch.zeros_like(batch.targets)) for batch in make_batches("mlp", "mse", 0, 2)]
    run = train(fitted, exact, quantities(names))
    assert run.instruments.unavailable == {}
    assert run.records[0]["GradNorm"] == [0.0] * 6
    assert {"NormTest", "InnerTest", "OrthoTest"}.isdisjoint(run.records[0])


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("every", [1, 3])
def test_a_step_s_later_backward_passes_are_plain_and_its_values_describe_the_first(every: int, scale: float) -> None:
    """Gradients accumulated over two micro-batches: the second forward pass is prepared for the
    next step before this step's update, and the second backward pass must neither overwrite the
    step's values nor leave the next step's plan without Alpha's end point. With ``scale`` (the
    micro-batches' mean, 0.5) the training is that of ``(scale * loss).backward()`` and the values
    describe the first micro-batch's own loss, unscaled."""
    model = ref.mlp(0)
    plain = copy.deepcopy(model)
    names = ("NormTest", "GradHist1d", "Alpha", "Loss", "GradNorm")
    opt, plain_opt = sgd(ref.trainable(model)), sgd(ref.trainable(plain))
    first = make_batches("mlp", "ce", 0, 7)
    second = make_batches("mlp", "ce", 1, 7)
    instruments = Instruments(model, first[0].loss_fn, first[0].per_sample_loss_fn, opt, quantities(names, Schedule(every=every), **histogram_options(model, first[0], 0.0)))
    thetas, found = [], {}
    for step in range(7):
        thetas.append(snapshot(model))
        opt.zero_grad()
        plain_opt.zero_grad()
        for batch in (first[step], second[step]):
            outputs = model(batch.inputs)
            instruments.backward(step, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets, scale=scale)
            (scale * batch.loss_fn(plain(batch.inputs), batch.targets)).backward()
        opt.step()
        plain_opt.step()
        instruments.after_update(step)
        found.update(instruments.completed(step))
        assert all(torch.equal(a, b) for a, b in zip(ref.trainable(model), ref.trainable(plain)))  # the same training
    found.update(instruments.finish())
    assert instruments.unavailable == {}
    assert len(instruments.changes) == 1 and "backward passes after its first" in instruments.changes[0]
    assert ("with scale=1/k" in instruments.changes[0]) == (scale == 1.0)  # the advice, where no scale was given
    tracked = [step for step in range(7) if step % every == 0]
    assert [step for step in sorted(found) if "Alpha" in found[step]] == tracked[:-1] if tracked[-1] == 6 else tracked
    for step in tracked:
        reference = copy.deepcopy(model)
        load(reference, thetas[step])
        grads = ref.per_sample_gradients(reference, first[step].per_sample_loss_fn, first[step].inputs, first[step].targets)
        assert_close(found[step]["NormTest"], ref.norm_test(grads))
        check_hist1d(found[step]["GradHist1d"], grads)
        assert_close(found[step]["GradNorm"], ref.grad_norm(grads))
        assert_close(found[step]["Loss"], float(first[step].loss_fn(reference(first[step].inputs), first[step].targets).detach()))
    thetas.append(snapshot(model))
    for step in (step for step in tracked if step < 6):  # the update is -lr times both micro-batches' gradient
        expected = curv.reference_alpha(copy.deepcopy(model), first[step].per_sample_loss_fn, first[step], first[step + 1], thetas[step], thetas[step + 1])
        assert found[step]["Alpha"] == pytest.approx(expected, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("change", ["unfreeze", "freeze"])
def test_parameters_frozen_or_unfrozen_after_attaching_are_said_once(change: str) -> None:
    """Progressive unfreezing (or freezing) after the instruments were attached: they go on with
    the parameters that trained then, and the run's warnings say which changed, once."""
    model = ref.mlp(0)
    if change == "unfreeze":
        model[0].requires_grad_(False)
    batches = make_batches("mlp", "ce", 0, 4)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(("NormTest", "GradNorm")))
    for step, batch in enumerate(batches):
        if step == 2:
            model[0].requires_grad_(change == "unfreeze")
        opt.zero_grad()
        outputs = model(batch.inputs)
        engine_step(instruments, opt, step, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets)
    said = "train but did not when the instruments were attached, which leave them out" if change == "unfreeze" else "no longer train, which the instruments count with zero gradients"
    assert instruments.changes == [f"from step 2: parameters '0.weight', '0.bias' {said} (attach the instruments after changing which parameters train)"]


def test_schedules_count_the_steps_taken_whatever_the_loop_numbers_them() -> None:
    """A loop that skips batches leaves gaps in its step numbers (0, 2, 4, ...): every second step
    taken is tracked, the values carry the loop's numbers and match the references there, and
    Alpha ends at the next step taken."""
    model = ref.mlp(0)
    names = ("NormTest", "Alpha", "Loss")
    opt = sgd(ref.trainable(model))
    batches = make_batches("mlp", "ce", 0, 5)
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(names, Schedule(every=2)))
    thetas, found = [], {}
    for count, batch in enumerate(batches):
        thetas.append(snapshot(model))
        opt.zero_grad()
        outputs = model(batch.inputs)
        found.update(engine_step(instruments, opt, 2 * count, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets))
    thetas.append(snapshot(model))
    found.update(instruments.finish())
    assert sorted(found) == [0, 4, 8] and [set(found[step]) for step in (0, 4, 8)] == [set(names)] * 2 + [{"NormTest", "Loss"}]
    for count in (0, 2, 4):
        reference = copy.deepcopy(model)
        load(reference, thetas[count])
        grads = ref.per_sample_gradients(reference, batches[count].per_sample_loss_fn, batches[count].inputs, batches[count].targets)
        assert_close(found[2 * count]["NormTest"], ref.norm_test(grads))
    for count in (0, 2):
        reference = copy.deepcopy(model)
        expected = curv.reference_alpha(reference, batches[count].per_sample_loss_fn, batches[count], batches[count + 1], thetas[count], thetas[count + 1], None, 0.0)
        assert found[2 * count]["Alpha"] == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_a_copy_of_the_model_carries_no_instruments_and_training_goes_on() -> None:
    """``copy.deepcopy(model)`` between steps (an average of the weights, the best model so far)
    raised a RecursionError where the Hessian's rules were attached: the instruments' hooks, bound
    methods, dragged the whole engine into the copy. A copy now gets hooks that do nothing, and so
    does the model pickled whole (``torch.save(model)``): the copies run on other inputs while a
    step records, and the values are those of a run without copies."""
    import io

    from cockpit_cli.instruments.model_hooks import ModelHook

    def run(with_copies: bool) -> dict[int, dict[str, Any]]:
        model = ref.cnn(0)
        batches = make_batches("cnn", "ce", 0, 2)
        loss_fn, per_sample = batches[0].loss_fn, batches[0].per_sample_loss_fn
        opt = sgd(ref.trainable(model))
        instruments = Instruments(model, loss_fn, per_sample, opt, quantities(("NormTest", "GradNorm", "Activations", "HessTrace")))
        records: dict[int, dict[str, Any]] = {}
        for step, (inputs, targets, *_) in enumerate(batches):
            copies = []
            if with_copies:
                buffer = io.BytesIO()
                torch.save(model, buffer)
                buffer.seek(0)
                copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
                assert not any(isinstance(hook, ModelHook) for duplicate in copies for module in duplicate.modules() for hook in module._forward_hooks.values())
            opt.zero_grad()
            outputs = model(inputs)
            for duplicate in copies:  # while the step records: unseen by the instruments
                duplicate(2.0 * inputs).sum().backward()
            records.update(engine_step(instruments, opt, step, loss_fn(outputs, targets), inputs, outputs, targets))
        assert instruments.unavailable == {}
        return records

    assert run(with_copies=True) == run(with_copies=False)
