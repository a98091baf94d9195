"""Curvature instruments against dense references: HessTrace, TICDiag, TICTrace, HessMaxEV.

The curvature diagonal is BackPACK's exact Hessian or exact GGN diagonal, plus lambda on the
decayed weights; the references build it entry by entry with autograd
(``reference_curvature``). The Monte-Carlo GGN is random, so only its shapes, finiteness and its
independence from the training's random state are checked. HessMaxEV's iteration stops at a
relative residual of 1e-2 (an eigenvalue lies that close, though in a cluster of nearly equal top
eigenvalues not necessarily the largest), so it is compared with the dense Hessian's
largest-magnitude eigenvalue to 1e-2.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import reference as ref
import reference_curvature as curv
from cockpit_cli.instruments import Instruments
from cockpit_cli.instruments.backend import GradientCapture
from cockpit_cli.instruments.engine import GRAPH_NOTE, MATH_ATTENTION_NOTE
from test_instruments_alpha import reference_alpha
from test_instruments_exact import BUILDERS, Attending, engine_step, CASES, DECAY, FIRST_ORDER, SEEDS, Run, assert_close, check_first_order, histogram_options, make_batches, one_thread, quantities, scaled_mlp, train  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DIAGONAL = ("HessTrace", "TICDiag", "TICTrace")
DIAGONALS = {"hessian": curv.hessian_diagonal, "ggn": curv.ggn_diagonal}


def reference_values(run: Run, step: int, curvature: str, weight_decay: float) -> dict[str, object]:
    """HessTrace, TICDiag and TICTrace of ``step`` from the dense references."""
    model = run.reference_model(step)
    inputs, targets, loss_fn, per_sample = run.batches[step]
    decayed = ref.weights(model) if weight_decay else None
    diagonal = DIAGONALS[curvature](model, loss_fn, inputs, targets, decayed, weight_decay)
    grads = ref.per_sample_gradients(model, per_sample, inputs, targets, decayed, weight_decay)
    return {"HessTrace": curv.hess_trace(diagonal), "TICDiag": curv.tic_diag(grads, diagonal), "TICTrace": curv.tic_trace(grads, diagonal)}


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("kind, loss", CASES)
def test_curvature_quantities_match_references(kind: str, loss: str, curvature: str, seed: int, weight_decay: float) -> None:
    run = train(BUILDERS[kind](seed), make_batches(kind, loss, seed, 2), quantities(DIAGONAL + ("GradNorm",)), weight_decay=weight_decay, curvature=curvature)
    assert run.instruments.unavailable == {}
    for step in range(2):
        values = run.records[step]
        expected = reference_values(run, step, curvature, weight_decay)
        assert_close(values["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(values["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(values["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


@pytest.mark.filterwarnings("error:The output of")  # BackPACK's warning of a modified loss
@pytest.mark.parametrize("weight", [0.25, 3.0])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("kind, loss", [*CASES, ("mlp", "bce")])
def test_curvature_of_a_loss_module_s_output_times_a_factor(kind: str, loss: str, curvature: str, weight: float) -> None:
    """``weight * loss_fn(outputs, targets)`` backpropagated: the curvature is ``weight`` times
    the module's (BackPACK's rules gave the module's own and warned)."""
    batches = make_batches(kind, "ce" if loss == "bce" else loss, 0, 2)
    if loss == "bce":
        bce = torch.nn.BCEWithLogitsLoss()
        batches = [b._replace(targets=torch.rand(len(b.targets), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)), loss_fn=bce) for i, b in enumerate(batches)]
    run = train(BUILDERS[kind](0), batches, quantities(("HessTrace", "GradNorm")), curvature=curvature, loss_weight=weight)
    assert run.instruments.unavailable == {}
    for step in range(2):
        inputs, targets, loss_fn, _ = run.batches[step]
        diagonal = DIAGONALS[curvature](run.reference_model(step), lambda o, t: weight * loss_fn(o, t), inputs, targets)
        assert_close(run.records[step]["HessTrace"], curv.hess_trace(diagonal), rel=1e-9, abs=1e-12)


WEIGHTED_MODELS = {  # per-sample gradients and curvature by BackPACK's rules, through its graph, by torch.func and autograd's rules
    "sequential": lambda: BUILDERS["mlp"](0),
    "graph": lambda: ResidualMLP(0),
    "torch.func": lambda: scaled_mlp(0),
}


@pytest.mark.parametrize("weight", [0.5, 3.0])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("model", sorted(WEIGHTED_MODELS))
def test_every_value_describes_a_loss_module_s_output_times_a_factor(model: str, curvature: str, weight: float) -> None:
    """``weight * loss_fn(outputs, targets)`` backpropagated: each sample's loss is ``weight``
    times the per-sample loss function's, also in the passes that compute the losses again from
    the loss functions (torch.func's per-sample gradients, BackPACK's graph, Alpha's losses and
    slopes), which gave the module's own values: MeanGSNR, CABS, the histograms, TICDiag and
    Alpha were those of another loss, and the graph's curvature went off."""
    run = train(WEIGHTED_MODELS[model](), make_batches("mlp", "ce", 0, 3), quantities(FIRST_ORDER + DIAGONAL + ("Alpha",)), curvature=curvature, loss_weight=weight)
    assert run.instruments.unavailable == {}
    run.batches = [
        batch._replace(loss_fn=lambda o, t, f=batch.loss_fn: weight * f(o, t), per_sample_loss_fn=lambda o, t, f=batch.per_sample_loss_fn: weight * f(o, t))
        for batch in run.batches
    ]
    for step in range(2):
        check_first_order(run, step)
        values, expected = run.records[step], reference_values(run, step, curvature, 0.0)
        assert_close(values["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(values["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(values["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)
        assert values["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize(
    "loss, expected",
    [
        (lambda out, reg: out, lambda out: 1.0),
        (lambda out, reg: out + torch.zeros(()), lambda out: 1.0),
        (lambda out, reg: out + reg, lambda out: 1.0),
        (lambda out, reg: 0.5 * out + reg, lambda out: 0.5),
        (lambda out, reg: (out + reg) / 4, lambda out: 0.25),
        (lambda out, reg: out + 0.5 * out * out, lambda out: 1.0 + float(out.detach())),
        (lambda out, reg: out + out, lambda out: 2.0),
    ],
    ids=["the output", "plus a constant", "plus a regulariser", "weighted", "divided", "plus a term of it", "twice"],
)
def test_the_factor_of_the_loss_module_s_output_in_the_loss(loss: Any, expected: Any) -> None:
    """The gradient that reaches the module's output (known without a backward pass where the loss
    adds terms without it to it), from its last call with a graph (not one without gradients)."""
    from cockpit_cli.instruments.loss_output_weight import LossModuleCalls

    model, (inputs, targets, loss_fn, _) = BUILDERS["mlp"](0), make_batches("mlp", "ce", 0, 1)[0]
    calls = LossModuleCalls(loss_fn)
    calls.watch()
    output = loss_fn(model(inputs), targets)
    with torch.no_grad():
        loss_fn(model(inputs), targets)  # (a value logged with the module)
    regularizer = 0.5 * sum(p.pow(2).sum() for p in model.parameters())
    assert calls.weight(loss(output, regularizer)) == pytest.approx(expected(output), rel=1e-12)
    assert calls._handle is None and calls._output is None
    assert LossModuleCalls(torch.nn.functional.cross_entropy).weight(0.5 * output) == 1.0  # (a function: not watched)


def test_gradients_taken_again_after_a_failure_of_the_instruments_keep_the_loss_s_factor() -> None:
    """After the instruments fail in a step's backward pass, the gradients are taken again from the
    loss module's value: times its factor in the step's loss (it was dropped, so the update was
    another loss's)."""
    from cockpit_cli.instruments.tracker import Tracker

    model, (inputs, targets, loss_fn, per_sample) = BUILDERS["mlp"](0), make_batches("mlp", "ce", 0, 1)[0]
    instruments = Instruments(model, loss_fn, per_sample, torch.optim.SGD(model.parameters(), lr=0.1), quantities(("NormTest",)))
    instruments.capture.backward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    tracker = Tracker(instruments, lambda record: None)
    outputs = model(inputs)
    tracker.backward(0, 0.25 * loss_fn(outputs, targets), inputs, outputs, targets)
    assert tracker.failure == "instruments switched off at step 0: RuntimeError: boom"
    expected = torch.autograd.grad(0.25 * loss_fn(model(inputs), targets), list(model.parameters()))
    for param, gradient in zip(model.parameters(), expected):
        assert torch.allclose(param.grad, gradient, rtol=1e-12, atol=0.0)


def test_curvature_of_a_loss_module_s_output_times_a_negative_factor_is_left_out_with_the_reason() -> None:
    run = train(BUILDERS["mlp"](0), make_batches("mlp", "ce", 0, 2), quantities(("HessTrace", "NormTest")), loss_weight=-0.5)
    assert run.instruments.unavailable == {
        "HessTrace": "failed at step 0 and was switched off: the loss module's output enters the loss times -0.5, whose curvature has no square-root factor"
    }
    assert all("NormTest" in values for values in run.records.values())


def test_a_loss_module_called_again_for_another_output_leaves_out_the_curvature_alone() -> None:
    """BackPACK's rules start from the module's last call, which here computed a value the loss
    does not contain (they backpropagated from the wrong outputs, or failed and switched every
    instrument off)."""
    model = BUILDERS["mlp"](0)
    batches = make_batches("mlp", "ce", 0, 2)
    loss_fn = batches[0].loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    instruments = Instruments(model, loss_fn, batches[0].per_sample_loss_fn, opt, quantities(("HessTrace", "NormTest")))
    found = {}
    for step, batch in enumerate(batches):
        opt.zero_grad()
        outputs = model(batch.inputs)
        loss = loss_fn(outputs, batch.targets)
        loss_fn(outputs.detach().flip(0), batch.targets)  # a value logged with the same module, after the loss
        found.update(engine_step(instruments, opt, step, loss, batch.inputs, outputs, batch.targets))
    found.update(instruments.finish())
    assert set(instruments.unavailable) == {"HessTrace"}
    assert "was called again after computing the loss" in instruments.unavailable["HessTrace"]
    assert all("NormTest" in values for values in found.values())


CLASS_WEIGHTS = torch.tensor([0.5, 3.0, 1.5], dtype=torch.float64)
CROSS_ENTROPY_OPTIONS = {  # each with targets at the ignore_index where there are classes
    "class weights": {"weight": CLASS_WEIGHTS},
    "label smoothing": {"label_smoothing": 0.2},
    "everything": {"weight": CLASS_WEIGHTS, "label_smoothing": 0.2, "ignore_index": 1},
    "soft targets": {"weight": CLASS_WEIGHTS},
}


def cross_entropy_batches(kind: str, name: str, steps: int) -> list[ref.Batch]:
    """Batches whose loss is a cross-entropy with ``CROSS_ENTROPY_OPTIONS[name]``, not a plain mean."""
    options = CROSS_ENTROPY_OPTIONS[name]
    loss_fn = torch.nn.CrossEntropyLoss(**options)
    batches = []
    for batch in make_batches(kind, "ce", 0, steps):
        targets = batch.targets.clone()
        if name == "soft targets":
            targets = torch.softmax(torch.randn(len(targets), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(len(batches))), dim=1)
        else:
            targets[::3] = loss_fn.ignore_index
        batches.append(batch._replace(targets=targets, loss_fn=loss_fn, per_sample_loss_fn=None))
    return batches


def share_gradients(model: torch.nn.Module, loss_fn: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """``g_i``: N times sample i's part of the gradient of the batch's loss (whose mean over the
    samples is the batch gradient), one backward pass per sample through its output alone."""
    params = ref.trainable(model)
    outputs = model(inputs)
    (output_gradients,) = torch.autograd.grad(loss_fn(outputs, targets), outputs, retain_graph=True)
    rows = [torch.autograd.grad(outputs[i], params, grad_outputs=len(inputs) * output_gradients[i], retain_graph=True) for i in range(len(inputs))]
    return [torch.stack(per_param) for per_param in zip(*rows)]


def check_loss_curvature(run: Run, curvature: str) -> None:
    """:func:`check_against_shares`, or for the Monte-Carlo GGN, which is random: finite and non-negative values."""
    if curvature != "ggn_mc":
        check_against_shares(run, curvature)
        return
    assert run.instruments.unavailable == {}
    assert all(math.isfinite(t) and t >= 0.0 for step in range(2) for t in run.records[step]["HessTrace"])


def check_against_shares(run: Run, curvature: str) -> None:
    """HessTrace, TICDiag and TICTrace of every step of ``run`` against the dense references, with
    the per-sample gradients of :func:`share_gradients` (its loss is no plain mean)."""
    assert run.instruments.unavailable == {}
    for step, (inputs, targets, loss_fn, _) in enumerate(run.batches):
        model = run.reference_model(step)
        diagonal = DIAGONALS[curvature](model, loss_fn, inputs, targets)
        grads = share_gradients(model, loss_fn, inputs, targets)
        values = run.records[step]
        assert_close(values["HessTrace"], curv.hess_trace(diagonal), rel=1e-9, abs=1e-12)
        assert_close(values["TICDiag"], curv.tic_diag(grads, diagonal), rel=1e-8, abs=1e-10)
        assert_close(values["TICTrace"], curv.tic_trace(grads, diagonal), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", list(CROSS_ENTROPY_OPTIONS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_curvature_quantities_of_a_cross_entropy_with_options(kind: str, name: str, curvature: str) -> None:
    """Class weights, ignored targets, label smoothing and soft targets weigh each sample's
    curvature differently from the plain mean's: HessTrace and TIC follow the very loss (class
    weights used to stop the backward pass inside BackPACK's rule)."""
    run = train(BUILDERS[kind](0), cross_entropy_batches(kind, name, 2), quantities(DIAGONAL + ("GradNorm",)), curvature=curvature)
    check_against_shares(run, curvature)


BINARY_OPTIONS = {"plain": {}, "weights": {"pos_weight": torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64), "weight": torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)}}


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ggn_mc"])
@pytest.mark.parametrize("name", list(BINARY_OPTIONS))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_curvature_quantities_of_binary_cross_entropy(kind: str, name: str, curvature: str) -> None:
    """Three binary outputs (one logit each, soft targets) with BCEWithLogitsLoss: the curvature
    diagonals exist (BackPACK has no rule of its own for the Hessian) and match the references."""
    loss_fn = torch.nn.BCEWithLogitsLoss(**BINARY_OPTIONS[name])
    batches = []
    for index, batch in enumerate(make_batches(kind, "ce", 0, 2)):
        targets = torch.rand(len(batch.targets), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(index))
        batches.append(batch._replace(targets=torch.where(targets < 0.3, 0.0, targets), loss_fn=loss_fn, per_sample_loss_fn=None))
    check_loss_curvature(train(BUILDERS[kind](0), batches, quantities(DIAGONAL + ("GradNorm",)), curvature=curvature), curvature)


ROBUST_LOSSES = {
    "Huber": lambda: torch.nn.HuberLoss(delta=0.8),
    "Huber summed": lambda: torch.nn.HuberLoss(delta=1.5, reduction="sum"),
    "SmoothL1": lambda: torch.nn.SmoothL1Loss(beta=0.6),
    "L1": lambda: torch.nn.L1Loss(),
}


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ggn_mc"])
@pytest.mark.parametrize("name", list(ROBUST_LOSSES))
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_curvature_quantities_of_robust_regression_losses(kind: str, name: str, curvature: str) -> None:
    """Huber, smooth L1 and L1 losses (targets spread so that residuals fall on both sides of the
    quadratic part's width) had no curvature rule: the curvature quantities were left out."""
    loss_fn = ROBUST_LOSSES[name]()
    batches = []
    for index, batch in enumerate(make_batches(kind, "mse", 0, 2)):
        targets = 2.0 * torch.randn(len(batch.targets), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(index))
        batches.append(batch._replace(targets=targets, loss_fn=loss_fn, per_sample_loss_fn=None))
    check_loss_curvature(train(BUILDERS[kind](0), batches, quantities(DIAGONAL + ("GradNorm",)), curvature=curvature), curvature)


def log_softmax_mlp(width: int) -> torch.nn.Sequential:
    """Linear(6, width), Tanh, Linear(width, 3), LogSoftmax, in float64 (for NLLLoss)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3), nn.LogSoftmax(dim=1)).double()


def nll_batches() -> list[ref.Batch]:
    per_sample = torch.nn.NLLLoss(reduction="none")
    return [batch._replace(loss_fn=torch.nn.NLLLoss(), per_sample_loss_fn=per_sample) for batch in make_batches("mlp", "ce", 0, 2)]


def transposed_log_softmax(_: int) -> torch.nn.Sequential:
    """A transposed convolution (per-sample gradients from BackPACK's rule, not the output hooks)
    before Tanh, Linear(8, 3) and LogSoftmax: [N, 6] -> [N, 3], 37 parameters."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Unflatten(1, (2, 3)), nn.ConvTranspose1d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3), nn.LogSoftmax(dim=1)).double()


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-at-a-time"])
@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("build, count", [(log_softmax_mlp, 123), (transposed_log_softmax, 37)], ids=["output-hooks", "backpack-rules"])
def test_a_small_model_with_a_loss_backpack_cannot_follow_gets_the_hessian_diagonal_from_products(
    build: Any, count: int, weight_decay: float, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NLLLoss after a LogSoftmax has no BackPACK rule: a model of at most PRODUCTS_MOST
    parameters gets the exact Hessian diagonal from a Hessian-vector product per parameter (of
    the loss as trained, regulariser included; batched, or one at a time where an operation
    cannot be batched), taken before the training's backward pass, whose hooks then take the
    per-sample gradients with it; the manifest says how."""
    from cockpit_cli.instruments.backend import GradientCapture
    from cockpit_cli.instruments.support import PRODUCTS_NOTE

    if not batched:
        products = GradientCapture.hessian_vector_product

        def unbatchable(self: GradientCapture, *args: Any) -> Any:
            product = products(self, *args)

            def one_at_a_time(vectors: list[torch.Tensor], batched: bool = False) -> list[torch.Tensor]:
                if batched:
                    raise RuntimeError("vmap: no batching rule")
                return product(vectors)

            return one_at_a_time

        monkeypatch.setattr(GradientCapture, "hessian_vector_product", unbatchable)
    model = build(12)  # (a weight of 72 entries: its products in two batches)
    batches = nll_batches()
    run = train(model, batches, quantities(DIAGONAL + ("NormTest", "HessMaxEV")), weight_decay=weight_decay)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_products
    assert run.instruments.support.per_sample == "backpack" and run.instruments.capture.factored == (build is log_softmax_mlp)
    reason = "the loss NLLLoss has no BackPACK curvature rule (needs CrossEntropyLoss, BCEWithLogitsLoss, MSELoss, HuberLoss, SmoothL1Loss or L1Loss)"
    assert PRODUCTS_NOTE.format(count=count, reason=reason) in run.instruments.describe()["notes"]
    for step in range(2):
        model_at = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        decayed = ref.weights(model_at) if weight_decay else None
        diagonal = curv.hessian_diagonal(model_at, loss_fn, inputs, targets, decayed, weight_decay)
        grads = [g + weight_decay * p.detach() if weight_decay and p.dim() > 1 else g for g, p in zip(share_gradients(model_at, loss_fn, inputs, targets), model_at.parameters())]
        values = run.records[step]
        assert_close(values["HessTrace"], curv.hess_trace(diagonal), rel=1e-9, abs=1e-12)
        assert_close(values["TICDiag"], curv.tic_diag(grads, diagonal), rel=1e-8, abs=1e-10)
        assert_close(values["TICTrace"], curv.tic_trace(grads, diagonal), rel=1e-9, abs=1e-12)
        check_first_order(run, step, names=("NormTest",), weight_decay=weight_decay)


class Offset(torch.nn.Module):
    """Adds a buffer (a state, which the curvature's rules of unknown layers do not take) times a parameter."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, features, dtype=torch.float64))
        self.weight = torch.nn.Parameter(torch.ones(features, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs + self.offset * self.weight


def offset_mlp(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """``model`` with an :class:`Offset` after its second layer."""
    return torch.nn.Sequential(*list(model)[:2], Offset(5), *list(model)[2:])


def products_models() -> dict[str, Any]:
    from test_instruments_exact import scaled_mlp
    from test_instruments_shared_layers import TiedLinears, sequential_twice

    return {
        "a layer with a state BackPACK does not know": lambda: offset_mlp(scaled_mlp(0)),
        "an operation of two tensors": lambda: GatedMLP(0),
        "a layer held twice": lambda: sequential_twice().double(),
        "tied weights": lambda: TiedLinears().double(),
    }


@pytest.mark.parametrize("name", ["a layer with a state BackPACK does not know", "an operation of two tensors", "a layer held twice", "tied weights"])
def test_small_models_backpack_s_curvature_rules_cannot_follow_get_the_hessian_diagonal_from_products(name: str) -> None:
    """Each had no curvature with the Hessian (the GGN's comes through the whole model), per-sample gradients from torch.func or the hooks."""
    torch.manual_seed(0)
    model = products_models()[name]()
    batches = make_batches("mlp", "ce", 0, 2)
    run = train(model, batches, quantities(DIAGONAL + ("NormTest",)), weight_decay=DECAY)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_products
    check_curvature(run, "hessian", weight_decay=DECAY)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",), weight_decay=DECAY)


class SmallAttending(torch.nn.Module):
    """MultiheadAttention(4, 1) over 5 positions, the elementwise maximum of its output and input
    (an operation of two tensors: BackPACK's graph cannot follow it), the positions' mean,
    Linear(4, 3): 95 parameters, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention, self.head = torch.nn.MultiheadAttention(4, 1, batch_first=True), torch.nn.Linear(4, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.maximum(self.attention(inputs, inputs, inputs, need_weights=False)[0], inputs).mean(1))


class ProjectedAttending(torch.nn.Module):
    """Queries, keys and values from one Linear(4, 12), scaled_dot_product_attention, the mean
    over 5 positions, Linear(4, 3): every trainable layer a Linear (the output hooks take the
    per-sample gradients), 75 parameters, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project, self.head = torch.nn.Linear(4, 12), torch.nn.Linear(4, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        queries, keys, values = self.project(inputs).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(queries, keys, values).mean(1))


@pytest.mark.parametrize("build", [SmallAttending, ProjectedAttending], ids=["MultiheadAttention", "output-hooks"])
def test_a_small_attention_model_gets_the_hessian_diagonal_from_products_on_the_math_kernel(build: Any) -> None:
    """Attention's fused kernel has no second derivative: the products take the loss computed
    again on the math kernel (said once), the per-sample values stay the training pass's (the
    output hooks ignore the pass that computes the loss again)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(2)
    batches = [ref.Batch(torch.randn(4, 5, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (4,), generator=generator), torch.nn.CrossEntropyLoss(), ref.cross_entropy_per_sample) for _ in range(2)]
    run = train(build(), batches, quantities(DIAGONAL + ("NormTest", "HessMaxEV"), HessMaxEV={"rtol": 1e-9, "atol": 0.0}))
    assert run.instruments.capture.factored == (build is ProjectedAttending)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_products
    assert run.instruments.changes == [f"from step 0: {MATH_ATTENTION_NOTE}"]
    with sdpa_kernel(SDPBackend.MATH):  # (the reference's Hessian needs it too)
        for step in range(2):
            expected = reference_values(run, step, "hessian", 0.0)
            assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
            assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
            assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-7)  # (the training's graph is not differentiated)
            check_first_order(run, step, names=("NormTest",))


def test_products_stay_for_small_models_and_the_hessian() -> None:
    """Above PRODUCTS_MOST parameters, or with a GGN asked for, the curvature stays out with BackPACK's reason."""
    from cockpit_cli.instruments.support import PRODUCTS_MOST

    large = log_softmax_mlp(64)
    assert sum(p.numel() for p in large.parameters()) > PRODUCTS_MOST
    reason = "the loss NLLLoss has no BackPACK curvature rule (needs CrossEntropyLoss, BCEWithLogitsLoss, MSELoss, HuberLoss, SmoothL1Loss or L1Loss)"
    for model, curvature in ((large, "hessian"), (log_softmax_mlp(4), "ggn")):
        run = train(model, nll_batches(), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
        assert run.instruments.unavailable == dict.fromkeys(DIAGONAL, reason)
        assert all("NormTest" in run.records[step] for step in range(2))


def test_a_small_model_whose_batch_norm_mixes_the_samples_gets_hess_trace_from_products() -> None:
    """Per-sample gradients do not exist there (TIC needs them), the batch's Hessian does."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    run = train(model, make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL))
    assert set(run.instruments.unavailable) == {"TICDiag", "TICTrace"} and "mixes the samples" in run.instruments.unavailable["TICDiag"]
    for step in range(2):
        model_at = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        model_at.train()
        assert_close(run.records[step]["HessTrace"], curv.hess_trace(curv.hessian_diagonal(model_at, loss_fn, inputs, targets)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_curvature_of_one_output_per_sample_as_a_vector(kind: str, loss: str, curvature: str) -> None:
    """A regression or a binary classifier whose outputs are ``[N]`` (a last layer of one output,
    flattened): BackPACK's rules took two-dimensional outputs only, and the ValueError stopped
    every instrument."""
    model = BUILDERS[kind](0)
    model = torch.nn.Sequential(*list(model)[:-1], torch.nn.Linear(model[-1].in_features, 1).double(), torch.nn.Flatten(0))
    loss_fn = torch.nn.MSELoss() if loss == "mse" else torch.nn.BCEWithLogitsLoss()
    batches = []
    for index, batch in enumerate(make_batches(kind, "ce", 0, 2)):
        targets = torch.rand(len(batch.targets), dtype=torch.float64, generator=torch.Generator().manual_seed(index))
        batches.append(batch._replace(targets=targets, loss_fn=loss_fn, per_sample_loss_fn=None))
    check_against_shares(train(model, batches, quantities(DIAGONAL + ("GradNorm",)), curvature=curvature), curvature)


@pytest.mark.parametrize("kind, loss", CASES)
def test_monte_carlo_ggn_is_finite_and_leaves_the_random_state_alone(kind: str, loss: str) -> None:
    model = BUILDERS[kind](0)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    run = train(model, make_batches(kind, loss, 0, 2), quantities(DIAGONAL), weight_decay=DECAY, curvature="ggn_mc")
    assert torch.equal(torch.get_rng_state(), before)
    num_params = len(run.thetas[0])
    for step in range(2):
        values = run.records[step]
        assert len(values["HessTrace"]) == num_params
        assert all(math.isfinite(t) and t >= 0.0 for t in values["HessTrace"])  # a GGN is positive semi-definite
        assert math.isfinite(values["TICDiag"]) and values["TICDiag"] >= 0.0
        assert math.isfinite(values["TICTrace"]) and values["TICTrace"] >= 0.0


def test_monte_carlo_ggn_is_reproducible_from_the_seed() -> None:
    """The Monte-Carlo draw comes from the global random state (restored afterwards): same seed, same value."""
    traces = []
    for _ in range(2):
        model = ref.mlp(0)
        torch.manual_seed(11)
        run = train(model, make_batches("mlp", "ce", 0, 1), quantities(("HessTrace",)), curvature="ggn_mc")
        traces.append(run.records[0]["HessTrace"])
    assert traces[0] == traces[1]


def dense_max_eigenvalue(run: Run, step: int, weight_decay: float) -> float:
    """Largest-magnitude eigenvalue of the dense Hessian of step ``step``'s loss."""
    model = run.reference_model(step)
    inputs, targets, loss_fn, _ = run.batches[step]
    decayed = ref.weights(model) if weight_decay else None
    return curv.max_abs_eigenvalue(curv.hessian(model, loss_fn, inputs, targets, decayed, weight_decay))


def attention_batches(steps: int) -> list[ref.Batch]:
    """``steps`` float64 batches of 4 sequences ``[4, 5, 8]`` for :class:`Attending`, with class targets."""
    generator = torch.Generator().manual_seed(2)
    return [ref.Batch(torch.randn(4, 5, 8, generator=generator, dtype=torch.float64), torch.randint(0, 3, (4,), generator=generator), torch.nn.CrossEntropyLoss(), ref.cross_entropy_per_sample) for _ in range(steps)]


def test_attention_gets_hess_max_ev_from_the_loss_computed_again_on_the_math_kernel() -> None:
    """The fused kernel torch runs attention with (on the CPU too) has no second derivative: HessMaxEV
    was switched off at step 0. The training's own forward passes keep their kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batches = attention_batches(3)
    run = train(Attending().double(), batches, quantities(("GradNorm", "HessMaxEV"), HessMaxEV={"rtol": 1e-9, "atol": 0.0}))
    assert run.instruments.unavailable == {} and run.instruments.changes == [f"from step 0: {MATH_ATTENTION_NOTE}"]
    with sdpa_kernel(SDPBackend.MATH):  # (the reference's dense Hessian needs it too)
        for step in range(3):
            assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-7)
    plain = train(Attending().double(), batches, None)
    for tracked, untracked in zip(run.thetas[-1], plain.thetas[-1]):
        torch.testing.assert_close(tracked, untracked, rtol=0, atol=0)


class FusedAttending(torch.nn.Module):
    """A linear map of a short sequence, self-attention by the CPU's fused kernel called directly
    (which no choice of kernel changes), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        heads = self.project(inputs).unsqueeze(1)  # [N, 1, L, E]
        attended = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(heads, heads, heads)[0]
        return self.head(attended.squeeze(1).mean(1))


def test_a_model_without_second_derivatives_switches_hess_max_ev_off_saying_why() -> None:
    run = train(FusedAttending(), [ref.Batch(b.inputs.float(), b.targets, b.loss_fn, b.per_sample_loss_fn) for b in attention_batches(2)], quantities(("GradNorm", "HessMaxEV")))
    assert run.instruments.unavailable == {
        "HessMaxEV": "failed at step 0 and was switched off: RuntimeError: derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward "
        "is not implemented (Hessian-vector products need the second derivative of every operation of the model; this one has none)"
    }
    assert run.instruments.changes == [] and all("GradNorm" in run.records[step] for step in range(2))  # the other quantities go on


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_hess_max_ev_beside_per_sample_quantities(kind: str) -> None:
    """Without a curvature diagonal, the per-sample values come from the output hooks in the same
    backward pass that leaves the gradients differentiable for the Hessian-vector products; the
    products' second pass through the graph passes the hooks again. Both sets of values match
    their references."""
    model = BUILDERS[kind](0)
    batches = make_batches(kind, "ce", 0, 2)
    tracked = quantities((*FIRST_ORDER, "HessMaxEV"), **histogram_options(model, batches[0], 0.0), HessMaxEV={"rtol": 1e-7, "atol": 0.0})
    run = train(model, batches, tracked)
    assert run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step)
        assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-6)


@pytest.mark.parametrize("rtol, tolerance", [(None, 3e-2), (1e-7, 1e-6)])
@pytest.mark.parametrize("seed, weight_decay", [(0, 0.0), (1, DECAY)])
@pytest.mark.parametrize("kind, loss", CASES)
def test_hess_max_ev_matches_dense_eigenvalue(kind: str, loss: str, seed: int, weight_decay: float, rtol: float | None, tolerance: float) -> None:
    """With the default residual tolerance (3% of the value) and with a tight one."""
    options = {} if rtol is None else {"rtol": rtol, "atol": 0.0}
    tracked = quantities(("HessMaxEV", "GradNorm"), HessMaxEV=options)
    run = train(BUILDERS[kind](seed), make_batches(kind, loss, seed, 2), tracked, weight_decay=weight_decay)
    for step in range(2):
        assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, weight_decay), rel=tolerance)
    assert len(tracked[0].iterations) == 2


@pytest.mark.parametrize("kind, loss", CASES)
def test_hess_max_ev_warm_start_needs_few_iterations(kind: str, loss: str) -> None:
    """Small steps on one batch barely move the Hessian: the previous eigenvector is nearly converged."""
    batch = make_batches(kind, loss, 0, 1)[0]
    small_steps = lambda params: torch.optim.SGD(params, lr=1e-3)  # noqa: E731
    counts = {}
    for warm_start in (True, False):
        tracked = quantities(("HessMaxEV",), HessMaxEV={"warm_start": warm_start, "rtol": 1e-2})
        run = train(BUILDERS[kind](0), [batch] * 3, tracked, optimizer=small_steps)
        counts[warm_start] = tracked[0].iterations
        for step in range(3):
            assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-2)
    assert counts[True][0] == counts[False][0] >= 4  # the same random first start
    assert max(counts[True][1:]) <= 2
    assert min(counts[False][1:]) >= 4


def test_hess_max_ev_leaves_the_random_state_alone() -> None:
    model = ref.cnn(0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    train(model, make_batches("cnn", "ce", 0, 2), quantities(("HessMaxEV",), HessMaxEV={"warm_start": False}))
    assert torch.equal(torch.get_rng_state(), before)


def test_hess_max_ev_starts_from_the_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``gradient_start`` the mini-batch gradient is the first start vector: a budget of one
    product gives its Rayleigh quotient ``g.Hg / g.g``. Without it the only start is the random
    vector (the previous eigenvector from the second step on)."""
    from cockpit_cli.instruments.quantities import hess_max_ev

    seen: list[list[torch.Tensor]] = []
    original = hess_max_ev.largest_eigenpair

    def spied(product: Any, starts: list[torch.Tensor], *args: Any) -> Any:
        seen.append([start.clone() for start in starts])
        return original(product, starts, *args)

    monkeypatch.setattr(hess_max_ev, "largest_eigenpair", spied)
    batches = make_batches("mlp", "ce", 0, 2)
    tracked = quantities(("HessMaxEV",), HessMaxEV={"max_iterations": 1})
    run = train(BUILDERS["mlp"](0), batches, tracked)
    assert tracked[0].iterations == [1, 1]
    for step in range(2):
        model = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        gradient = torch.cat([g.reshape(-1) for g in ref.batch_gradient(model, loss_fn, inputs, targets)])
        hessian = curv.hessian(model, loss_fn, inputs, targets)
        assert run.records[step]["HessMaxEV"] == pytest.approx(float(gradient @ hessian @ gradient / (gradient @ gradient)), rel=1e-9)
        assert len(seen[step]) == 2
        torch.testing.assert_close(seen[step][0], gradient, rtol=1e-12, atol=1e-14)
    seen.clear()
    tracked = quantities(("HessMaxEV",), HessMaxEV={"gradient_start": False})
    train(BUILDERS["mlp"](0), batches, tracked)
    assert [len(starts) for starts in seen] == [1, 1]


def _diagonals(model: torch.nn.Module, extension: object, attribute: str, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    from backpack import backpack, extend

    model = extend(model)
    loss_function = extend(torch.nn.CrossEntropyLoss())
    model.zero_grad()
    torch.manual_seed(5)  # the Monte-Carlo GGN draws the same samples for both extensions
    with backpack(extension):
        loss_function(model(inputs), targets).backward()
    diagonals = [getattr(p, attribute).clone() for p in model.parameters()]
    for p in model.parameters():
        delattr(p, attribute)
    return diagonals


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ggn_mc"])
def test_convolution_diagonals_a_sample_at_a_time_match_backpack(curvature: str) -> None:
    """The blockwise convolution-weight diagonals equal BackPACK's own, for 1-D and 2-D
    convolutions with stride, dilation, padding (also "same", which BackPACK's rule cannot unfold:
    its reference is the same layer with the padding as numbers) and a grouped one (BackPACK's rule)."""
    import copy

    from cockpit_cli.instruments.curvature_diagonal import CURVATURES, curvature_extension
    from cockpit_cli.instruments.convolutions import numeric_padding

    nn = torch.nn
    torch.manual_seed(0)
    net2d = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Sigmoid(),
        nn.Conv2d(6, 4, 3, dilation=2, padding="same"), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    ).double()
    net1d = nn.Sequential(nn.Conv1d(2, 3, 4, stride=3, padding=2), nn.Sigmoid(), nn.Conv1d(3, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2 * 5, 5)).double()
    stock, attribute = CURVATURES[curvature]
    for model, inputs in ((net2d, torch.randn(7, 3, 8, 8, dtype=torch.float64)), (net1d, torch.randn(7, 2, 13, dtype=torch.float64))):
        targets = torch.randint(0, 5, (7,))
        numeric = copy.deepcopy(model)
        for layer in numeric.modules():
            if isinstance(getattr(layer, "padding", None), str):
                layer.padding = numeric_padding(layer)
        expected = _diagonals(numeric, stock(), attribute, inputs, targets)
        actual = _diagonals(model, curvature_extension(curvature), attribute, inputs, targets)
        for a, e in zip(actual, expected):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)
            assert e.abs().max() > 0


def same_padding_cnn(seed: int, kernel: int) -> torch.nn.Sequential:
    """The reference cnn with its convolution padded "same" (float64): [N, 2, 6, 6] -> [N, 3]."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(2, 3, kernel, padding="same"), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 3)).double()


def test_same_padding_gets_exact_curvature() -> None:
    run = train(same_padding_cnn(0, 3), make_batches("cnn", "ce", 0, 2), quantities(DIAGONAL + ("GradNorm",)), curvature="hessian")
    assert run.instruments.unavailable == {}
    for step in range(2):
        expected = reference_values(run, step, "hessian", 0.0)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)


def image_batches(shape: tuple[int, ...], loss: str, steps: int = 2) -> list[ref.Batch]:
    """``steps`` batches of 6 float64 inputs ``[6, *shape]`` for ``loss`` ("ce" or "mse")."""
    result = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(10 + step)
        inputs = torch.randn(6, *shape, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (6,), generator=generator) if loss == "ce" else torch.randn(6, 3, generator=generator, dtype=torch.float64)
        result.append(ref.Batch(inputs, targets, *ref.loss_functions(loss)))
    return result


def check_curvature(run: Run, curvature: str, steps: int = 2, weight_decay: float = 0.0) -> None:
    """HessTrace, TICDiag and TICTrace of every step against the dense references."""
    for step in range(steps):
        expected = reference_values(run, step, curvature, weight_decay)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(run.records[step]["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


def averaging_cnn(dims: int, seed: int) -> torch.nn.Sequential:
    """Conv(2, 3, 2), average pooling by 2 (of an odd size: its transposed product pads the end),
    Tanh, average pooling of 3 with stride 2 and padding 1, Linear(., 3), in float64:
    ``[N, 2, *(6,) * dims]`` -> ``[N, 3]``."""
    torch.manual_seed(seed)
    nn = torch.nn
    conv, pool = {1: (nn.Conv1d, nn.AvgPool1d), 2: (nn.Conv2d, nn.AvgPool2d)}[dims]
    return nn.Sequential(conv(2, 3, 2), pool(2), nn.Tanh(), pool(3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 1**dims, 3)).double()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("dims", [1, 2])
def test_average_pooling_in_float64_gets_exact_curvature(dims: int, loss: str, curvature: str) -> None:
    """BackPACK's rules of average pooling computed in float32 and raised for a float64 model."""
    run = train(averaging_cnn(dims, 0), image_batches((2, *(6,) * dims), loss), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature)


POOLING_OPTIONS = {
    "ceil_mode": dict(ceil_mode=True),  # windows past the end, divided by what they cover
    "count_include_pad=False": dict(count_include_pad=False),
    "divisor_override": dict(divisor_override=3),
}


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("options", sorted(POOLING_OPTIONS))
def test_average_pooling_with_any_options_gets_exact_curvature(options: str, curvature: str) -> None:
    """BackPACK's rules divided every window by the kernel's size and raised where windows pass
    the end, inside the backward pass (the per-sample quantities went off with them)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.AvgPool2d(3, stride=2, padding=1, **POOLING_OPTIONS[options]), nn.Tanh(), nn.Flatten()).double()
    model.append(nn.Linear(model(torch.zeros(1, 2, 6, 6, dtype=torch.float64)).shape[1], 3).double())
    run = train(model, image_batches((2, 6, 6), "ce"), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 2)])
def test_adaptive_average_pooling_to_any_size_gets_exact_curvature(size: tuple[int, int], curvature: str) -> None:
    """BackPACK's rules needed the input's size a multiple of the output's (here 5 x 5), and
    computed in float32."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.SiLU(), nn.AdaptiveAvgPool2d(size), nn.Flatten(), nn.Linear(3 * size[0] * size[1], 3)).double()
    run = train(model, image_batches((2, 6, 6), "mse"), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature)


LINEAR_LAYERS = {  # a layer between Conv2d(2, 4, 2) (outputs [4, 5, 5]) and Tanh, Flatten, Linear(., 3)
    "AvgPool2d": lambda: torch.nn.AvgPool2d(2), "AdaptiveAvgPool2d": lambda: torch.nn.AdaptiveAvgPool2d(2),
    "ZeroPad2d": lambda: torch.nn.ZeroPad2d((1, 0, 2, 1)), "ConstantPad2d": lambda: torch.nn.ConstantPad2d(1, 0.5),
    "ReflectionPad2d": lambda: torch.nn.ReflectionPad2d(2), "ReplicationPad2d": lambda: torch.nn.ReplicationPad2d((1, 2, 0, 1)),
    "CircularPad2d": lambda: torch.nn.CircularPad2d(1),
    "Upsample nearest": lambda: torch.nn.Upsample(scale_factor=2), "Upsample bilinear": lambda: torch.nn.Upsample(size=(7, 6), mode="bilinear"),
    "UpsamplingNearest2d": lambda: torch.nn.UpsamplingNearest2d(scale_factor=2), "UpsamplingBilinear2d": lambda: torch.nn.UpsamplingBilinear2d(size=(3, 4)),
    "PixelShuffle": lambda: torch.nn.PixelShuffle(2), "PixelUnshuffle": lambda: torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.PixelUnshuffle(2)),
    "ChannelShuffle": lambda: torch.nn.ChannelShuffle(2),
    "Unfold": lambda: torch.nn.Unfold(2, dilation=2), "Fold": lambda: torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Fold((6, 6), 2)),
    "Unflatten": lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Unflatten(1, (4, 25))),
}  # fmt: skip


def test_every_linear_layer_with_a_rule_through_its_own_computation_is_checked() -> None:
    """Each class of ``linear_layers.LINEAR_LAYERS`` is checked below, or its 2-d variant is (the
    same rule, and torch's same computation in other dimensions)."""
    from cockpit_cli.instruments.linear_layers import LINEAR_LAYERS as RULED

    checked = {type(layer) for build in LINEAR_LAYERS.values() for layer in build().modules() if not list(layer.children())}
    as_2d = {cls: getattr(torch.nn, cls.__name__.replace("1d", "2d").replace("3d", "2d")) for cls in RULED}
    assert {as_2d[cls] for cls in RULED} <= checked


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("layer", sorted(LINEAR_LAYERS))
def test_linear_layers_without_parameters_get_exact_curvature(layer: str, curvature: str) -> None:
    """Padding other than with zeros, upsampling, the shuffles, folding and reshaping had no
    BackPACK rule and left out the curvature."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 4, 2), LINEAR_LAYERS[layer](), nn.Tanh(), nn.Flatten()).double()
    model.append(nn.Linear(model(torch.zeros(1, 2, 6, 6, dtype=torch.float64)).shape[1], 3).double())
    if any(isinstance(m, nn.Sequential) for m in model[1].modules()):
        model = nn.Sequential(model[0], *model[1], *model[2:])  # the layers of the inner Sequential as the model's own
    run = train(model, image_batches((2, 6, 6), "ce"), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature)


def positions_mlp(affine: bool) -> torch.nn.Sequential:
    """Linear(6, 8) as 2 positions of 4 features, LayerNorm(4) of each, Tanh, Flatten, Linear(8, 3)."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), nn.LayerNorm(4, elementwise_affine=affine), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))


NORMALIZED = {
    "LayerNorm": lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)),
    "LayerNorm over positions": lambda: positions_mlp(True),
    "LayerNorm without affine": lambda: positions_mlp(False),
    "GroupNorm": lambda: torch.nn.Sequential(torch.nn.Unflatten(1, (2, 3)), torch.nn.Conv1d(2, 4, 2), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8, 3)),
    "LayerNorm over two dimensions at 3 positions": lambda: torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Unflatten(1, (3, 2, 2)), torch.nn.LayerNorm((2, 2), bias=False), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 3)),
    "GroupNorm of images": lambda: torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 2, 3)), torch.nn.Conv2d(1, 4, (1, 2)), torch.nn.GroupNorm(2, 4), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(16, 3)),
    "GroupNorm without affine": lambda: torch.nn.Sequential(torch.nn.Unflatten(1, (2, 3)), torch.nn.Conv1d(2, 4, 2), torch.nn.GroupNorm(1, 4, affine=False), torch.nn.Flatten(), torch.nn.Linear(8, 3)),
    "RMSNorm": lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.RMSNorm(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)),
    "RMSNorm over two dimensions at 3 positions, eps 0.1": lambda: torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Unflatten(1, (3, 2, 2)), torch.nn.RMSNorm((2, 2), eps=0.1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 3)),
    "RMSNorm without affine": lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Unflatten(1, (2, 4)), torch.nn.RMSNorm(4, elementwise_affine=False), torch.nn.Flatten(), torch.nn.Linear(8, 3)),
}  # fmt: skip


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ggn_mc"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("layers", sorted(NORMALIZED))
def test_layer_group_and_rms_norm_get_the_curvature_diagonals(layers: str, loss: str, curvature: str) -> None:
    """BackPACK has no rules for them: a model with them got no curvature. At steps with
    curvature every per-sample gradient comes from BackPACK's rules, theirs included; the
    Hessian's adds the normalisation's second derivative, which is not diagonal."""
    torch.manual_seed(0)
    model = NORMALIZED[layers]().double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("weight") and param.dim() == 1:
                param.normal_()  # layer norm starts with zero biases and unit scales
    batches = make_batches("mlp", loss, 0, 2)
    run = train(model, batches, quantities(DIAGONAL + FIRST_ORDER, **histogram_options(model, batches[0], 0.0)), curvature=curvature)
    assert run.instruments.unavailable == {}
    for step in range(2):
        check_first_order(run, step)
    if curvature == "ggn_mc":
        assert all(math.isfinite(run.records[step]["TICTrace"]) and sum(run.records[step]["HessTrace"]) > 0 for step in range(2))
    else:
        check_curvature(run, curvature)


class GroupNormResidual(torch.nn.Module):
    """The input plus Tanh(GroupNorm(Conv2d(2, 2, 3, padding=1))) of it, Flatten, Linear(72, 3)
    (``rms``: RMSNorm over the last two dimensions in place of the group norm)."""

    def __init__(self, rms: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        norm = nn.RMSNorm((6, 6)) if rms else nn.GroupNorm(2, 2)
        self.conv, self.norm, self.act, self.flatten, self.out = nn.Conv2d(2, 2, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.flatten(inputs + self.act(self.norm(self.conv(inputs)))))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("rms", [False, True], ids=["GroupNorm", "RMSNorm"])
def test_a_residual_network_with_group_or_rms_norm_gets_the_curvature_through_backpack_s_graph(rms: bool, curvature: str) -> None:
    run = train(GroupNormResidual(rms), make_batches("cnn", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_graph
    check_curvature(run, curvature)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))


def normalised_mlp(seed: int) -> torch.nn.Sequential:
    """Linear(6, 5), BatchNorm1d(5) in eval mode (running statistics away from 0 and 1),
    Identity, Tanh, Linear(5, 3), in float64: [N, 6] -> [N, 3]."""
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Identity(), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    return model.eval()


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ggn_mc"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_batch_norm_in_eval_mode_and_identity_get_the_curvature_diagonals(loss: str, curvature: str) -> None:
    """BatchNorm in eval mode is affine in its input and parameters: BackPACK has GGN rules for
    it, and the Hessian's are the GGN's with no residual (BackPACK has none; the Hessian was left
    out). Monte-Carlo: finite and positive."""
    batches = image_batches((6,), loss)
    run = train(normalised_mlp(0), batches, quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    if curvature == "ggn_mc":
        assert all(math.isfinite(run.records[step]["TICTrace"]) and sum(run.records[step]["HessTrace"]) > 0 for step in range(2))
    else:
        check_curvature(run, curvature)


class Tokens(torch.nn.Module):
    """Embedding(7, 4) of 3 token ids, Flatten, a residual Tanh(Linear(12, 12)), Linear(12, 3): [N, 3] ids -> [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.embed, self.flatten, self.inner, self.squash, self.out = nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        features = self.flatten(self.embed(ids))
        return self.out(features + self.squash(self.inner(features)))


def token_batches(steps: int) -> list[ref.Batch]:
    """``steps`` batches of 6 samples of 3 token ids below 7 (id 0 among them), with class targets."""
    generator = torch.Generator().manual_seed(1)
    return [ref.Batch(torch.randint(0, 7, (6, 3), generator=generator), torch.randint(0, 3, (6,), generator=generator), *ref.loss_functions("ce")) for _ in range(steps)]


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("curvature, sequential", [("hessian", True), ("ggn", True), ("hessian", False), ("ggn", False)])
def test_an_embedding_gets_exact_curvature_from_the_rows_its_ids_touch(curvature: str, sequential: bool, padding_idx: int | None) -> None:
    """BackPACK's GGN rule of an embedding forms every sample's gradient of the whole table, and the
    Hessian had none: the curvature was left out."""
    nn = torch.nn
    torch.manual_seed(0)
    if sequential:
        model = nn.Sequential(nn.Embedding(7, 4, padding_idx=padding_idx), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    else:
        model = Tokens().double()
        model.embed.padding_idx = padding_idx
    run = train(model, token_batches(2), quantities(DIAGONAL), weight_decay=DECAY, curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature, weight_decay=DECAY)


def test_the_embedding_diagonal_in_blocks_of_columns_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.instruments import row_blocks
    from cockpit_cli.instruments.embedding_curvature import embedding_weight_diagonal

    module = torch.nn.Embedding(7, 4, padding_idx=2).double()
    module.input0 = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(0))
    factor = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    whole = embedding_weight_diagonal(module, factor)
    expected = torch.zeros(7, 4, dtype=torch.float64)
    for column in factor:
        for sample, ids in zip(column, module.input0):
            table = torch.zeros(7, 4, dtype=torch.float64).index_add_(0, ids, sample)
            table[2] = 0.0
            expected += table.square()
    torch.testing.assert_close(whole, expected)
    monkeypatch.setattr(row_blocks, "CHUNK_ELEMENTS", 20)  # two columns at a time
    torch.testing.assert_close(embedding_weight_diagonal(module, factor), whole)


@pytest.mark.parametrize("sequential", [True, False])
def test_an_embedding_that_renormalises_its_rows_leaves_out_the_curvature_saying_why(sequential: bool) -> None:
    from cockpit_cli.instruments.support import check_support

    nn = torch.nn
    model = nn.Sequential(nn.Embedding(7, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3)) if sequential else Tokens()
    if not sequential:
        model.embed.max_norm = 1.0
    support = check_support(model, nn.CrossEntropyLoss(), "ggn")
    assert not support.curvature
    name = "0" if sequential else "embed"
    assert support.curvature_reason == f"layer '{name}' (Embedding) has settings BackPACK's curvature rule does not cover (Only max_norm=None supported.)"


ACTIVATIONS = {
    "GELU": lambda: torch.nn.GELU(), "GELU tanh": lambda: torch.nn.GELU(approximate="tanh"), "SiLU": lambda: torch.nn.SiLU(),
    "Mish": lambda: torch.nn.Mish(), "Softplus": lambda: torch.nn.Softplus(beta=2.0), "CELU": lambda: torch.nn.CELU(0.7),
    "Softsign": lambda: torch.nn.Softsign(), "Tanhshrink": lambda: torch.nn.Tanhshrink(), "Hardtanh": lambda: torch.nn.Hardtanh(-0.5, 0.5),
    "ReLU6": lambda: torch.nn.ReLU6(), "Hardswish": lambda: torch.nn.Hardswish(), "Hardsigmoid": lambda: torch.nn.Hardsigmoid(),
    "Softshrink": lambda: torch.nn.Softshrink(0.2), "Hardshrink": lambda: torch.nn.Hardshrink(0.2), "Threshold": lambda: torch.nn.Threshold(0.1, -1.0),
    "Identity": lambda: torch.nn.Identity(),
    "SiLU in place": lambda: torch.nn.SiLU(inplace=True), "Hardtanh in place": lambda: torch.nn.Hardtanh(-0.5, 0.5, inplace=True),
}  # fmt: skip


def activated_mlp(name: str, seed: int) -> torch.nn.Sequential:
    """Linear(6, 5), the activation, Linear(5, 4), the activation, Linear(4, 3), in float64."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 5), ACTIVATIONS[name](), nn.Linear(5, 4), ACTIVATIONS[name](), nn.Linear(4, 3)).double()


def test_every_elementwise_activation_with_a_rule_of_autograd_is_checked() -> None:
    from cockpit_cli.instruments.elementwise_activations import ELEMENTWISE

    assert set(ELEMENTWISE) == {type(build()) for build in ACTIVATIONS.values()}


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_elementwise_activations_without_backpack_rules_get_exact_curvature(name: str, loss: str, curvature: str) -> None:
    """GELU, SiLU, Softplus, ... had no BackPACK rule and left out the curvature: their
    derivatives now come from autograd (the Hessian's residual from the second derivative)."""
    model = activated_mlp(name, 0)
    run = train(model, make_batches("mlp", loss, 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    # torch cannot differentiate Hardsigmoid twice; piecewise linear, its Hessian's diagonal is the GGN's
    check_curvature(run, "ggn" if name == "Hardsigmoid" else curvature)
    assert [getattr(layer, "inplace", False) for layer in model] == [False, name.endswith("in place"), False, name.endswith("in place"), False]


class Reshape(torch.nn.Module):
    """A model's own module that reshapes every sample (no rule of BackPACK's knows it)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(inputs.shape[0], *self.shape)


class Jitter(torch.nn.Module):
    """A model's own module that adds noise in training mode: computed again, its output differs."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs + 0.1 * torch.randn_like(inputs) if self.training else inputs


def parameterless(name: str) -> torch.nn.Sequential:
    """A small float64 network with the layer ``name`` (no parameters, no BackPACK rule) inside."""
    nn = torch.nn
    torch.manual_seed(0)
    images = [nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, (1, 2))]  # [N, 6] -> [N, 4, 2, 2]
    layers = {
        "AdaptiveMaxPool2d": [*images, nn.AdaptiveMaxPool2d((1, 2)), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)],
        "LocalResponseNorm": [*images, nn.LocalResponseNorm(2), nn.Flatten(), nn.Linear(16, 3)],
        "LPPool2d": [*images, nn.LPPool2d(2, (2, 1)), nn.Flatten(), nn.Linear(8, 3)],
        "Softmax": [nn.Linear(6, 5), nn.Softmax(dim=1), nn.Linear(5, 3)],
        "a model's own reshaping": [nn.Linear(6, 8), Reshape(2, 4), nn.Tanh(), Reshape(8), nn.Linear(8, 3)],
        "Dropout2d in eval mode": [*images, nn.Dropout2d(0.5), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 3)],
    }[name]
    model = nn.Sequential(*layers).double()
    return model.eval() if "eval mode" in name else model


PARAMETERLESS = ["AdaptiveMaxPool2d", "LocalResponseNorm", "LPPool2d", "Softmax", "a model's own reshaping", "Dropout2d in eval mode"]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", PARAMETERLESS)
def test_layers_without_parameters_or_backpack_rules_get_exact_curvature_through_autograd(name: str, loss: str, curvature: str) -> None:
    """They left out the curvature: their factors now pass back by autograd at their inputs, and
    the Hessian's adds their second derivative (none for a reshaping)."""
    run = train(parameterless(name), make_batches("mlp", loss, 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature)


def test_the_second_derivative_of_a_layer_without_parameters_is_its_hessian_and_none_where_it_is_affine() -> None:
    from cockpit_cli.instruments.autograd_layers import autograd_residual

    torch.manual_seed(0)
    softmax, reshape = torch.nn.Softmax(dim=1), Reshape(2, 2)
    for layer in (softmax, reshape):
        layer.input0 = torch.randn(3, 4, dtype=torch.float64)
        layer.output = layer(layer.input0)
    grad_output = torch.randn(3, 4, dtype=torch.float64)
    assert autograd_residual(reshape, grad_output.reshape(3, 2, 2)) == []
    (positive, plus), (negative, minus) = autograd_residual(softmax, grad_output)
    assert (plus, minus) == (1.0, -1.0) and positive.shape == negative.shape == (4, 3, 4)
    for sample in range(3):
        expected = torch.autograd.functional.hessian(lambda x: (grad_output[sample] * torch.softmax(x, 0)).sum(), softmax.input0[sample])
        columns_plus, columns_minus = positive[:, sample].T, negative[:, sample].T  # [element, column]
        torch.testing.assert_close(columns_plus @ columns_plus.T - columns_minus @ columns_minus.T, expected)


def test_a_layer_computed_again_may_differ_by_rounding_but_not_by_random_numbers() -> None:
    """Attention computed again summed in another order (its first pass's inputs required
    gradients, these do not): 3e-16 apart in float64, which switched a transformer's curvature off
    as if the layer drew random numbers."""
    from cockpit_cli.instruments.autograd_layers import unreproducible

    torch.manual_seed(0)
    softmax, jitter = torch.nn.Softmax(dim=1), Jitter()
    for layer in (softmax, jitter):
        layer.input0 = torch.randn(3, 4, dtype=torch.float64)
        layer.output = layer(layer.input0)
    softmax.output = softmax.output * (1 + 4e-16)
    assert unreproducible(softmax) is None
    assert "differs" in unreproducible(jitter)
    softmax.output = softmax.output * (1 + 1e-6)
    assert "differs" in unreproducible(softmax)


class Gate(torch.nn.Module):
    """``x sigmoid(w) + tanh(x w)``, elementwise: an output not linear in its parameter."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * torch.sigmoid(self.weight) + torch.tanh(inputs * self.weight)


class Mixing(torch.nn.Module):
    """``x tanh(W) + b x``: a matrix parameter the output is not linear in, and a linear one."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(features, features) / features)
        self.bias = torch.nn.Parameter(torch.randn(features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ torch.tanh(self.weight) + self.bias * inputs


def with_parameters(name: str) -> torch.nn.Sequential:
    """A small float64 network with the layer ``name`` inside (parameters, no BackPACK rule)."""
    from test_instruments_exact import scaled_mlp

    nn = torch.nn
    if name == "Scale":
        return scaled_mlp(0)
    torch.manual_seed(0)
    layers = {
        "PReLU, a slope per feature": [nn.Linear(6, 5), nn.PReLU(5), nn.Linear(5, 3)],
        "PReLU, one slope": [nn.Linear(6, 5), nn.PReLU(), nn.Tanh(), nn.Linear(5, 3)],
        "PReLU of images": [nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, (1, 2)), nn.PReLU(4), nn.Flatten(), nn.Linear(16, 3)],
        "Gate": [nn.Linear(6, 5), Gate(5), nn.Linear(5, 3)],
        "Gate first": [Gate(6), nn.Linear(6, 3)],
        "Mixing": [nn.Linear(6, 5), nn.Tanh(), Mixing(5), nn.Linear(5, 3)],
    }[name]
    return nn.Sequential(*layers).double()


WITH_PARAMETERS = ["PReLU, a slope per feature", "PReLU, one slope", "PReLU of images", "Scale", "Gate", "Gate first", "Mixing"]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", WITH_PARAMETERS)
def test_layers_with_parameters_and_no_backpack_rules_get_exact_curvature_through_autograd(name: str, loss: str, curvature: str) -> None:
    """They left out the curvature (per-sample gradients from torch.func): their parameters now
    get the factors' squared per-sample gradients by torch.func, and the Hessian adds their own
    second derivative where the output is not linear in them (Gate, Mixing); not from products,
    which a small model's Hessian diagonal fell back to."""
    run = train(with_parameters(name), make_batches("mlp", loss, 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    assert run.instruments.support.per_sample == "functorch" and not run.instruments.support.curvature_by_products
    check_curvature(run, curvature)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_layers_with_parameters_get_exact_curvature_with_weight_decay(curvature: str) -> None:
    run = train(with_parameters("Mixing"), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), weight_decay=DECAY, curvature=curvature)
    assert run.instruments.unavailable == {}
    check_curvature(run, curvature, weight_decay=DECAY)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",), weight_decay=DECAY)


def test_layers_with_parameters_get_the_monte_carlo_ggn_through_autograd() -> None:
    run = train(with_parameters("Gate"), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL), curvature="ggn_mc")
    check_loss_curvature(run, "ggn_mc")


def test_a_layer_s_own_second_derivative_is_the_hessian_of_its_parameters_and_none_where_linear() -> None:
    from cockpit_cli.instruments.autograd_layers import own_second_derivative

    torch.manual_seed(0)
    layer = Mixing(3).double()
    layer.input0 = torch.randn(4, 3, dtype=torch.float64)
    grad_output = torch.randn(4, 3, dtype=torch.float64)
    diagonals = own_second_derivative(layer, grad_output, ["weight", "bias"])
    assert set(diagonals) == {"weight"}  # linear in the bias
    expected = torch.autograd.functional.hessian(lambda w: ((layer.input0 @ torch.tanh(w)) * grad_output).sum(), layer.weight.detach())
    torch.testing.assert_close(diagonals["weight"], expected.reshape(9, 9).diagonal().reshape(3, 3))


def test_a_piecewise_linear_layer_has_no_second_derivative_however_many_parameters_it_has() -> None:
    """Autograd records a dependence of PReLU's gradients on its input and slope whose derivative
    is zero: a product with a random vector tells, instead of a Hessian-vector product per input
    element (and an eigendecomposition of zeros) or a refusal past 4,096 parameters."""
    from cockpit_cli.instruments.autograd_layers import autograd_residual, own_second_derivative

    torch.manual_seed(0)
    layer = torch.nn.PReLU(5000).double()
    layer.input0 = torch.randn(4, 5000, dtype=torch.float64)
    layer.output = layer(layer.input0)
    grad_output = torch.randn(4, 5000, dtype=torch.float64)
    assert autograd_residual(layer, grad_output) == [] and own_second_derivative(layer, grad_output, ["weight"]) == {}


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_layer_whose_columns_autograd_cannot_batch_passes_them_back_as_samples_of_a_larger_batch(curvature: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where an operation has no batching rule, ``J^T`` of all columns is one backward pass of the
    layer on its input repeated once per column (it treats every sample alone), not a pass per column."""
    from cockpit_cli.instruments import autograd_layers

    batched = autograd_layers._batched_gradient

    def unbatchable(*args: Any, one_at_a_time: bool = True, **kwargs: Any) -> torch.Tensor:
        if not one_at_a_time:
            raise RuntimeError("no batching rule (forced)")
        return batched(*args, **kwargs)

    as_samples, passed = autograd_layers._as_samples, []

    def counted(module: torch.nn.Module, mat: torch.Tensor) -> torch.Tensor:
        passed.append(mat.shape[0])
        return as_samples(module, mat)

    monkeypatch.setattr(autograd_layers, "_batched_gradient", unbatchable)
    monkeypatch.setattr(autograd_layers, "_as_samples", counted)
    run = train(with_parameters("Gate"), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL), curvature=curvature)
    assert passed and run.instruments.unavailable == {}
    check_curvature(run, curvature)


def test_a_large_layer_not_linear_in_its_parameters_leaves_out_the_hessian_diagonal_and_names_the_ggn() -> None:
    """Its own second derivative would take a Hessian-vector product per parameter (4,290 here):
    the curvature quantities go off with the reason at the first step, the per-sample ones (from
    torch.func) stay; the GGN's diagonal is exact."""
    nn = torch.nn

    def wide() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 65), nn.Tanh(), Mixing(65), nn.Linear(65, 3)).double()

    run = train(wide(), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="hessian")
    reason = run.instruments.unavailable["HessTrace"]
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert "layer '2' (Mixing)" in reason and "4225 parameters" in reason and "curvature: ggn" in reason
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))
    run = train(wide(), make_batches("mlp", "ce", 0, 1), quantities(DIAGONAL), curvature="ggn")
    assert run.instruments.unavailable == {}
    check_curvature(run, "ggn", steps=1)


class PReLUResidual(torch.nn.Module):
    """``Linear(x) + PReLU(Linear(x))``, Linear(5, 3): a graph with a layer BackPACK has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.first, self.act, self.out = nn.Linear(6, 5), nn.PReLU(5), nn.Linear(5, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.first(inputs)
        return self.out(hidden + self.act(hidden))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_graph_with_a_layer_backpack_has_no_rules_for_gets_the_curvature_and_torch_func_s_per_sample_gradients(curvature: str) -> None:
    """The graph's pass took BackPACK's per-sample gradients with the curvature, so a layer without
    a BackPACK rule (PReLU) left the curvature out; the pass now gives the diagonals alone, and
    torch.func's per-sample gradients take them (TIC) after the training's backward pass."""
    run = train(PReLUResidual(), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), weight_decay=DECAY, curvature=curvature)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_graph and run.instruments.support.per_sample == "functorch"
    check_curvature(run, curvature, weight_decay=DECAY)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",), weight_decay=DECAY)


class Encoded(torch.nn.Module):
    """Linear(4, 8) of each of 6 positions, a TransformerEncoderLayer(8, 2 heads, feed-forward 16,
    ``dropout``), Flatten, Linear(48, 3), float64: ``[N, 6, 4]`` -> ``[N, 3]``."""

    def __init__(self, dropout: float = 0.0, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.embed = nn.Linear(4, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=dropout, batch_first=batch_first, norm_first=norm_first, activation="gelu")
        self.flatten, self.head = nn.Flatten(), nn.Linear(48, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.block(self.embed(inputs))))


class SelfAttending(torch.nn.Module):
    """Linear(4, ``width``) of each of 6 positions, their self-attention (MultiheadAttention, 2 heads,
    ``weights``: with its attention weights, unused) added to them, LayerNorm, Flatten, Linear(., 3),
    float64: ``[N, 6, 4]`` -> ``[N, 3]``; ``cross``: the keys and values from the inputs themselves."""

    def __init__(self, weights: bool = False, dropout: float = 0.0, width: int = 8, cross: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.embed, self.attention = nn.Linear(4, width), nn.MultiheadAttention(width, 2, batch_first=True, dropout=dropout, kdim=4, vdim=4) if cross else nn.MultiheadAttention(width, 2, batch_first=True, dropout=dropout)
        self.norm, self.flatten, self.head = nn.LayerNorm(width), nn.Flatten(), nn.Linear(6 * width, 3)
        self.weights, self.cross = weights, cross
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        source = inputs if self.cross else hidden
        attended = self.attention(hidden, source, source, need_weights=self.weights)[0]
        return self.head(self.flatten(self.norm(hidden + attended)))


class CausalAttention(torch.nn.Module):
    """Causal self-attention written with tensor operations (split, view, transpose,
    ``scaled_dot_product_attention``), as language models write it: Linear(d, 3 d) to queries,
    keys and values, ``heads`` heads, Linear(d, d)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width), heads

    def split_heads(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[N, heads, T, d / heads]`` of ``inputs`` ``[N, T, d]``."""
        n, t, d = inputs.shape
        q, k, v = self.qkv(inputs).split(d, dim=2)
        q = q.view(n, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(n, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(n, t, self.heads, d // self.heads).transpose(1, 2)
        return q, k, v

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        n, t, d = inputs.shape
        q, k, v = self.split_heads(inputs)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).contiguous().view(n, t, d))


class MaskedAttention(CausalAttention):
    """:class:`CausalAttention` computed by hand: ``q k^T`` scaled, a causal mask kept as a buffer
    (``masked_fill``), softmax, times ``v``."""

    def __init__(self, width: int, heads: int, positions: int = 6) -> None:
        super().__init__(width, heads)
        self.register_buffer("mask", torch.tril(torch.ones(positions, positions, dtype=torch.bool)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        n, t, d = inputs.shape
        q, k, v = self.split_heads(inputs)
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        weights = torch.softmax(scores.masked_fill(~self.mask[:t, :t], float("-inf")), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).contiguous().view(n, t, d))


class PreNormBlock(torch.nn.Module):
    """``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (Linear, GELU, Linear)."""

    def __init__(self, width: int, heads: int, masked: bool = False) -> None:
        super().__init__()
        nn = torch.nn
        attention = MaskedAttention(width, heads) if masked else CausalAttention(width, heads)
        self.norm1, self.attention, self.norm2 = nn.LayerNorm(width), attention, nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs + self.attention(self.norm1(inputs))
        return hidden + self.mlp(self.norm2(hidden))


class SmallLanguageModel(torch.nn.Module):
    """Linear(4, 8) of each of 6 positions, a :class:`PreNormBlock` (8 wide, 2 heads), Flatten,
    Linear(48, 3), float64; ``pooled``: the mean over the positions (a tensor method) and Linear(8, 3);
    ``masked``: its attention a :class:`MaskedAttention`."""

    def __init__(self, pooled: bool = False, masked: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.embed, self.block, self.flatten = nn.Linear(4, 8), PreNormBlock(8, 2, masked), nn.Flatten()
        self.head = nn.Linear(8 if pooled else 48, 3)
        self.pooled = pooled
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.block(self.embed(inputs))
        return self.head(hidden.mean(1) if self.pooled else self.flatten(hidden))


def whole_layer_models() -> dict[str, Any]:
    from test_instruments_exact import parametrized_mlp

    nn = torch.nn

    def in_sequence() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(48, 3)).double()

    return {
        "TransformerEncoderLayer": lambda: Encoded(),
        "TransformerEncoderLayer, norm first, dropout in eval mode": lambda: Encoded(dropout=0.1, norm_first=True).eval(),
        "TransformerEncoderLayer in an nn.Sequential": in_sequence,
        "self-attention": lambda: SelfAttending(),
        "self-attention with its weights": lambda: SelfAttending(weights=True),
        "weight_norm": lambda: parametrized_mlp("weight_norm"),
        "causal self-attention written with tensor operations": lambda: SmallLanguageModel(),
        "causal self-attention, pooled by a tensor method": lambda: SmallLanguageModel(pooled=True),
        "causal attention by hand, its mask a buffer": lambda: SmallLanguageModel(masked=True),
    }


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", ["TransformerEncoderLayer", "TransformerEncoderLayer, norm first, dropout in eval mode", "TransformerEncoderLayer in an nn.Sequential", "self-attention", "self-attention with its weights", "weight_norm", "causal self-attention written with tensor operations", "causal self-attention, pooled by a tensor method", "causal attention by hand, its mask a buffer"])
def test_layers_with_sublayers_of_their_own_get_exact_curvature_through_backpack_s_graph_whole(name: str, curvature: str) -> None:
    """Attention held its parameters beside its sublayers, which BackPACK's rules cannot follow: no
    curvature. The graph now calls such a layer as one (a self-attention, whose three inputs are
    one and whose tuple's first element alone is used, through a layer of one input), autograd's
    rules follow it whole (its parameters and sublayers' together, per sample by torch.func), and
    torch.func's per-sample gradients take the diagonals with them. The references on attention's
    math kernel (its fused kernels have no second derivative). A block of the model's own that
    computes with tensor operations (causal attention) is called as a layer, taken whole; the
    blocks around it stay traced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from test_instruments_exact import make_batches_of_sequences

    model = whole_layer_models()[name]()
    batches = make_batches("mlp", "ce", 0, 2) if name == "weight_norm" else make_batches_of_sequences(2)
    run = train(model, batches, quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    assert run.instruments.support.curvature_by_graph and not run.instruments.support.curvature_by_products
    with sdpa_kernel(SDPBackend.MATH):
        check_curvature(run, curvature)
        for step in range(2):
            check_first_order(run, step, names=("NormTest",))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("self-attention dropping out", "layer 'attention' (MultiheadAttention) drops out in training mode, which the curvature's rules cannot draw again sample by sample (dropout 0, or eval mode, gives the curvature)"),
        ("an encoder layer dropping out", "layer 'block' (TransformerEncoderLayer) drops out in training mode, which the curvature's rules cannot draw again sample by sample (dropout 0, or eval mode, gives the curvature)"),
        ("samples along the second dimension", "layer 'block' (TransformerEncoderLayer) takes the samples along its second dimension (batch_first=False), which the curvature's rules cannot take apart (batch_first=True gives the curvature)"),
        ("wide self-attention, Hessian", "layer 'attention' (MultiheadAttention) holds attention, whose output is not linear in its 5328 parameters: their Hessian diagonal would take a Hessian-vector product each (at most 4096); curvature: ggn gives the GGN's diagonal"),
    ],
)
def test_layers_with_sublayers_the_curvature_s_rules_cannot_follow_whole_say_why(name: str, reason: str) -> None:
    from cockpit_cli.instruments.support import check_support

    model = {
        "self-attention dropping out": lambda: SelfAttending(dropout=0.1),
        "an encoder layer dropping out": lambda: Encoded(dropout=0.1),
        "samples along the second dimension": lambda: Encoded(batch_first=False),
        "wide self-attention, Hessian": lambda: SelfAttending(width=36),
    }[name]()
    support = check_support(model, torch.nn.CrossEntropyLoss(), "hessian" if "Hessian" in name else "ggn")
    assert not support.curvature and support.curvature_reason == reason


def test_a_layer_that_changes_its_parameters_in_a_pre_hook_gets_no_curvature() -> None:
    """The old ``torch.nn.utils.weight_norm`` sets the weight from two parameters before each
    forward pass: the rules, which run the layer's own computation, would miss them."""
    import warnings

    from cockpit_cli.instruments.support import check_support

    nn = torch.nn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (deprecated)
        normed = nn.utils.weight_norm(Gate(5), name="weight", dim=None)
    model = nn.Sequential(nn.Linear(6, 5), normed, nn.Linear(5, 3)).double()
    support = check_support(model, nn.CrossEntropyLoss(), "ggn")
    assert not support.curvature and "forward pre-hook" in support.curvature_reason


@pytest.mark.parametrize("dropout", ["Dropout1d", "Dropout2d"])
def test_channel_dropout_in_training_mode_gets_the_curvature_of_its_step_s_mask(dropout: str) -> None:
    """BackPACK's dropout rule reads the mask from the output: the curvature of the network with
    the channels the step dropped (the reference runs with the step's random state)."""
    nn = torch.nn
    torch.manual_seed(0)
    layer = {"Dropout1d": nn.Dropout1d(0.5), "Dropout2d": nn.Dropout2d(0.5)}[dropout]
    shape, conv = ((2, 3), nn.Conv1d(2, 4, 2)) if dropout == "Dropout1d" else ((1, 2, 3), nn.Conv2d(1, 4, (1, 2)))
    model = nn.Sequential(nn.Unflatten(1, shape), conv, layer, nn.Tanh(), nn.Flatten(), nn.Linear(8 if dropout == "Dropout1d" else 16, 3)).double()
    run = train(model, make_batches("mlp", "ce", 0, 2), quantities(("HessTrace",)), curvature="hessian")
    assert run.instruments.unavailable == {}
    for step in range(2):
        reference_model = run.reference_model(step)
        inputs, targets, loss_fn, _ = run.batches[step]
        torch.set_rng_state(run.rng_states[step])
        expected = curv.hess_trace(curv.hessian_diagonal(reference_model, loss_fn, inputs, targets))
        assert_close(run.records[step]["HessTrace"], expected, rel=1e-9, abs=1e-12)


def test_a_layer_without_parameters_that_draws_random_numbers_leaves_out_the_curvature_alone() -> None:
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), Jitter(), nn.Tanh(), nn.Linear(5, 3)).double()
    run = train(model, make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert run.instruments.unavailable["HessTrace"] == (
        "failed at step 0 and was switched off: layer '1' (Jitter): its output, computed again from its input, differs "
        "(it draws random numbers or keeps a state)"
    )
    assert all("NormTest" in run.records[step] for step in range(2))
    model = nn.Sequential(nn.Linear(6, 5), nn.RReLU(), nn.Linear(5, 3)).double()
    run = train(model, make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL), curvature="ggn")
    assert run.instruments.unavailable["HessTrace"] == "layer '1' (RReLU) draws random numbers in training mode, which the curvature's rules cannot draw again"


def test_a_residual_model_with_gelu_gets_the_ggn_through_backpack_s_graph() -> None:
    model = ResidualMLP(0)
    model.squash = torch.nn.GELU()
    run = train(model, make_batches("mlp", "mse", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_graph
    check_curvature(run, "ggn")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # torch's note on this very padding
def test_a_compiled_model_gets_no_curvature_with_the_reason() -> None:
    from cockpit_cli.instruments.support import check_support

    for curvature in ("hessian", "ggn"):  # (small as it is, its graph cannot be differentiated twice for products)
        assert not check_support(torch.compile(BUILDERS["mlp"](0)), torch.nn.CrossEntropyLoss(), curvature).curvature
    support = check_support(torch.compile(BUILDERS["mlp"](0)), torch.nn.CrossEntropyLoss(), "ggn")  # compiles at its first call only
    assert not support.curvature
    assert support.curvature_reason == "the model is compiled (torch.compile), which BackPACK's curvature rules cannot extend"


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_in_place_activations_compute_out_of_place_while_backpack_s_hooks_are_on(kind: str) -> None:
    """``ReLU(inplace=True)`` changes the output of the layer before it, which BackPACK's backward
    hooks forbid (torch raised in the user's forward pass at every curvature step): the module
    computes the same values out of place while the hooks are on, and in place again after."""
    model = BUILDERS[kind](0)
    relu = next(module for module in model if isinstance(module, torch.nn.ReLU))
    relu.inplace = True
    run = train(model, make_batches(kind, "ce", 0, 2), quantities(DIAGONAL + ("GradNorm", "NormTest")), curvature="hessian")
    assert run.instruments.unavailable == {} and relu.inplace
    for step in range(2):
        expected = reference_values(run, step, "hessian", 0.0)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_compiled_model_gets_hess_max_ev_from_its_uncompiled_module(kind: str) -> None:
    """torch.compile's graphs cannot be differentiated twice (aot_eager has the same autograd as
    inductor, without its code generation): the Hessian-vector products take the loss again
    through the module it wraps (times the factor of the loss module's output in the loss), and
    every value equals the uncompiled model's. A loss with a term the module does not compute
    leaves HessMaxEV out with the reason, the rest goes on."""
    names = ("HessMaxEV", "NormTest", "GradNorm", "Alpha", "GradHist1d")
    batches = make_batches(kind, "ce", 0, 3)
    eager = train(BUILDERS[kind](0), batches, quantities(names))
    compiled = train(torch.compile(BUILDERS[kind](0), backend="aot_eager"), batches, quantities(names))
    assert compiled.instruments.unavailable == {} and set(compiled.records) == set(eager.records) == {0, 1, 2}
    for step, values in eager.records.items():
        for name, value in values.items():
            if name == "GradHist1d":
                assert compiled.records[step][name]["counts"] == value["counts"], step
            elif name != "Time":
                assert compiled.records[step][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, name)
    weighted = train(torch.compile(BUILDERS[kind](0), backend="aot_eager"), batches, quantities(names), loss_weight=0.5)
    weighted_eager = train(BUILDERS[kind](0), batches, quantities(names), loss_weight=0.5)
    assert weighted.instruments.unavailable == {}
    for step in (0, 1, 2):
        assert weighted.records[step]["HessMaxEV"] == pytest.approx(weighted_eager.records[step]["HessMaxEV"], rel=1e-6)
    assert weighted.records[0]["HessMaxEV"] == pytest.approx(0.5 * eager.records[0]["HessMaxEV"], rel=1e-2)  # (to the iteration's residual)
    penalized = train(torch.compile(BUILDERS[kind](0), backend="aot_eager"), batches, quantities(names), output_term=output_penalty)
    assert set(penalized.instruments.unavailable) == {"HessMaxEV"}
    assert "ValueError: the loss computed again without torch.compile" in penalized.instruments.unavailable["HessMaxEV"]
    assert all("NormTest" in values for values in penalized.records.values())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_uneven_same_padding_leaves_out_the_hessian_diagonal_with_the_reason() -> None:
    """(the GGN's comes through the whole model: test_a_model_backpack_s_graph_cannot_follow_gets_the_ggn_diagonal_through_the_whole_model)"""
    from cockpit_cli.instruments import support

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 8, 2, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3)).double()
    assert sum(p.numel() for p in model.parameters()) > support.PRODUCTS_MOST  # (a smaller one's comes from products)
    run = train(model, make_batches("cnn", "ce", 0, 2), quantities(DIAGONAL + ("GradNorm", "NormTest")), curvature="hessian")
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert "layer '0' (Conv2d) pads 'same' unevenly" in run.instruments.unavailable["HessTrace"]
    assert {"GradNorm", "NormTest"} <= set(run.records[1])


def test_hess_max_ev_continues_from_a_checkpoint_as_if_never_stopped() -> None:
    """The carried eigenvector (views of one flat vector) goes through torch.save and a
    ``weights_only`` load, and the next step then takes the same products to the same value."""
    import io

    from cockpit_cli.instruments.quantities.hess_max_ev import HessMaxEV

    batches = make_batches("cnn", "ce", 0, 3)
    whole = quantities(("HessMaxEV",))
    uninterrupted = train(BUILDERS["cnn"](0), batches, whole)
    first = quantities(("HessMaxEV",))
    stopped = train(BUILDERS["cnn"](0), batches[:2], first)
    buffer = io.BytesIO()
    torch.save(first[0].state_dict(), buffer)
    buffer.seek(0)
    resumed = HessMaxEV(first[0].schedule)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.eigenvector, first[0].eigenvector))
    continued = train(stopped.reference_model(2), batches[2:], [resumed])
    assert continued.records[0]["HessMaxEV"] == uninterrupted.records[2]["HessMaxEV"]
    assert resumed.iterations == whole[0].iterations[2:]


@pytest.mark.parametrize("others", [(), ("GradNorm", "NormTest", "GradHist1d"), ("HessTrace", "NormTest")])
def test_hess_max_ev_differentiates_the_gradients_of_the_one_backward_pass(others: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """With no other quantity, with per-sample statistics from output hooks, and with BackPACK's
    curvature pass, the products differentiate the gradients that the step's backward pass left
    differentiable (no second backward pass for a graph), the values stay exact, and the
    optimizer sees plain gradients again: the graph is released before the update."""
    taken_again = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        if kwargs.get("create_graph"):
            taken_again.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    seen_by_update = []

    def recording_sgd(params):
        optimizer = torch.optim.SGD(params, lr=0.1)
        step = optimizer.step
        optimizer.step = lambda: (seen_by_update.append([p.grad.grad_fn is None and not p.grad.requires_grad for p in params]), step())[1]
        return optimizer

    run = train(BUILDERS["cnn"](0), make_batches("cnn", "ce", 0, 2), quantities(("HessMaxEV", *others)), optimizer=recording_sgd)
    monkeypatch.undo()  # the references below take gradients with a graph
    for step in range(2):
        assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-2)
        for name in others:
            assert run.records[step][name] is not None
    assert taken_again == []
    assert seen_by_update and all(all(flags) for flags in seen_by_update)


def test_hessian_vector_products_that_cannot_be_taken_switch_off_hess_max_ev_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: GradientCapture, *arguments: object) -> None:
        raise RuntimeError("no second derivative")

    monkeypatch.setattr(GradientCapture, "hessian_vector_product", broken)
    run = train(BUILDERS["mlp"](0), make_batches("mlp", "ce", 0, 2), quantities(("HessMaxEV", "NormTest", "GradNorm")))
    assert run.instruments.unavailable == {"HessMaxEV": "failed at step 0 and was switched off: RuntimeError: no second derivative"}
    assert all({"NormTest", "GradNorm"} <= set(run.records[step]) for step in (0, 1))


# --- models that are no nn.Sequential: BackPACK's graph of them -----------------------------------


class ResidualMLP(torch.nn.Module):
    """Linear(6, 5)-ReLU, plus Sigmoid(Linear(5, 5)) of that (a residual connection), Linear(5, 3)."""

    def __init__(self, seed: int, in_place: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.relu = torch.nn.Linear(6, 5), torch.nn.ReLU(inplace=in_place)
        self.branch, self.squash, self.out = torch.nn.Linear(5, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.first(inputs))
        return self.out(hidden + self.squash(self.branch(hidden)))


class ResidualCNN(torch.nn.Module):
    """The input plus ReLU(Conv2d(2, 2, 3, padding=1)) of it, MaxPool2d(2), Flatten, Linear(18, 3)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.relu, self.pool = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)
        self.flatten, self.out = torch.nn.Flatten(), torch.nn.Linear(18, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.flatten(self.pool(inputs + self.relu(self.conv(inputs)))))


RESIDUAL = {"mlp": ResidualMLP, "cnn": ResidualCNN}


class Branching(torch.nn.Module):
    """Residual connections in a residual connection, layers with second derivatives in every
    branch (Tanh, Sigmoid, ELU), branches scaled by numbers, and one tensor feeding three layers:
    Linear(6, 5)-Tanh as h; inner = h + Sigmoid(Linear(5, 5)(h));
    Linear(5, 3) of 2 (inner + 0.5 Tanh(Linear(5, 5)(inner)) + ELU(Linear(5, 5)(h)))."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        self.first, self.tanh, self.branch, self.squash = nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid()
        self.again, self.bend, self.side, self.elu, self.out = nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.ELU(), nn.Linear(5, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.tanh(self.first(inputs))
        inner = hidden + self.squash(self.branch(hidden))
        outer = inner + 0.5 * self.bend(self.again(inner)) + self.elu(self.side(hidden))
        return self.out(outer * 2.0)


class NormalizedResidualCNN(torch.nn.Module):
    """Tanh(BatchNorm2d(Conv2d(2, 3, 3, padding=1))) as h, in eval mode; h plus
    Tanh(BatchNorm2d(Conv2d(3, 3, 3, padding=1))(h)); AvgPool2d(2), Flatten, Linear(27, 3)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        self.conv, self.norm, self.tanh = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()
        self.again, self.renorm, self.bend = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh()
        self.pool, self.flatten, self.out = nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, 3)
        self.double()
        with torch.no_grad():  # running statistics and affine maps away from 0 and 1
            for norm in (self.norm, self.renorm):
                norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0), norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.tanh(self.norm(self.conv(inputs)))
        return self.out(self.flatten(self.pool(hidden + self.bend(self.renorm(self.again(hidden))))))


class ParameterlessResidualCNN(torch.nn.Module):
    """Layers without parameters and without BackPACK rules in a residual network: Tanh of
    LocalResponseNorm(Conv2d(2, 3, 3, padding=1)) as h; h + 0.5 Softmax over the channels of
    Conv2d(3, 3, 3, padding=1)(h); AdaptiveMaxPool2d(2), Flatten, Linear(12, 3)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        self.conv, self.norm, self.tanh = nn.Conv2d(2, 3, 3, padding=1), nn.LocalResponseNorm(2), nn.Tanh()
        self.again, self.softmax = nn.Conv2d(3, 3, 3, padding=1), nn.Softmax(dim=1)
        self.pool, self.flatten, self.out = nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.tanh(self.norm(self.conv(inputs)))
        return self.out(self.flatten(self.pool(hidden + 0.5 * self.softmax(self.again(hidden)))))


GRAPH_MODELS = {**RESIDUAL, "branching": Branching, "normalized": NormalizedResidualCNN, "parameterless": ParameterlessResidualCNN}
IMAGE_MODELS = ("cnn", "normalized", "parameterless")
RESIDUAL_CASES = [("mlp", "ce"), ("mlp", "mse"), ("cnn", "ce"), ("cnn", "mse"), ("branching", "ce"), ("normalized", "mse"), ("parameterless", "ce")]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("model_name, loss", RESIDUAL_CASES)
def test_curvature_of_a_residual_model_comes_from_backpack_s_graph_of_it(model_name: str, loss: str, weight_decay: float, curvature: str) -> None:
    """Every quantity at a step with curvature, per-sample ones included, from one pass through
    BackPACK's graph of the model beside the training's own. The Hessian's factors that meet
    where branches join add up by origin (their cross terms), its residuals stay beside them."""
    model = GRAPH_MODELS[model_name](0)
    layers = [name for name, _ in model.named_modules()]
    batches = make_batches("cnn" if model_name in IMAGE_MODELS else "mlp", loss, 0, 2)
    run = train(model, batches, quantities(FIRST_ORDER + DIAGONAL, **histogram_options(model, batches[0], weight_decay)), weight_decay=weight_decay, curvature=curvature)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_graph
    assert [name for name, _ in model.named_modules()] == layers  # the converter's scalings are the graph's alone
    assert run.instruments.describe()["notes"] == [GRAPH_NOTE]  # its cost, in the manifest
    for step in range(2):
        check_first_order(run, step, weight_decay=weight_decay)
        expected = reference_values(run, step, curvature, weight_decay)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
        assert_close(run.records[step]["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


def test_hessian_factors_that_meet_add_up_by_origin_and_a_rule_leaves_the_ones_it_was_given_alone() -> None:
    from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule

    from cockpit_cli.instruments.curvature_diagonal import curvature_extension
    from cockpit_cli.instruments.extension_rules import module_rules
    from cockpit_cli.instruments.graph_hessian import merge_factors

    shared, own, other = object(), object(), object()
    first, second, third, fourth = (torch.full((1, 2, 3), float(k)) for k in range(1, 5))
    merged = merge_factors({"matrices": [first, second], "signs": [1.0, -1.0], "origins": [shared, own]}, {"matrices": [third, fourth], "signs": [1.0, 1.0], "origins": [shared, other]})
    assert merged["signs"] == [1.0, -1.0, 1.0] and merged["origins"] == [shared, own, other]
    assert [float(m[0, 0, 0]) for m in merged["matrices"]] == [4.0, 2.0, 4.0] and float(first[0, 0, 0]) == 1.0  # out of place
    extension = curvature_extension("hessian")
    rule = module_rules(extension)[torch.nn.Tanh]
    assert isinstance(rule, DiagHBaseModule)
    layer = torch.nn.Tanh()
    layer.input0 = torch.randn(2, 3)
    layer.output = layer(layer.input0)
    given = {"matrices": [first], "signs": [1.0], "origins": [shared]}
    result = rule.backpropagate(extension, layer, (None,), (torch.ones(2, 3),), given)
    assert given == {"matrices": [first], "signs": [1.0], "origins": [shared]}  # one list reaches every input of a sum
    assert len(result["matrices"]) == len(result["signs"]) == len(result["origins"]) == 3  # the residual's two parts
    assert result["origins"][0] is shared and len({id(o) for o in result["origins"]}) == 3


@pytest.mark.parametrize("model_name", ["mlp", "branching"])
def test_a_curvature_that_does_not_fit_leaves_the_per_sample_values_of_a_residual_model_s_first_step(model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory estimate comes after the forward pass, which ran without hooks for the pass
    through the graph; the per-sample values of that step were missing, without a reason."""
    from cockpit_cli.instruments import curvature_memory

    monkeypatch.setattr(curvature_memory, "available_bytes", lambda device: 1)
    model = GRAPH_MODELS[model_name](0)
    batches = make_batches("mlp", "ce", 0, 2)
    run = train(model, batches, quantities(FIRST_ORDER + DIAGONAL, **histogram_options(model, batches[0], 0.0)), curvature="hessian")
    assert set(run.instruments.unavailable) == set(DIAGONAL) and run.instruments.unavailable["HessTrace"].startswith("the curvature diagonal (hessian) would need")
    for step in range(2):
        check_first_order(run, step)


class ResidualMLPWithSpare(ResidualMLP):
    """:class:`ResidualMLP` with a layer its forward pass never calls."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.spare = torch.nn.Linear(2, 2).double()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("names", [FIRST_ORDER + DIAGONAL, ("HessTrace",)], ids=["with-per-sample", "curvature-alone"])
def test_a_layer_the_forward_pass_skips_has_the_regulariser_s_curvature(names: tuple[str, ...], weight_decay: float, curvature: str) -> None:
    """Its curvature diagonal is lambda (zero without a regulariser); its HessTrace was None."""
    model = ResidualMLPWithSpare(0)
    batches = make_batches("mlp", "ce", 0, 2)
    run = train(model, batches, quantities(names, **histogram_options(model, batches[0], weight_decay)), weight_decay=weight_decay, curvature=curvature)
    assert run.instruments.unavailable == {} and run.instruments.support.curvature_by_graph
    for step in range(2):
        expected = reference_values(run, step, curvature, weight_decay)
        assert_close(run.records[step]["HessTrace"], expected["HessTrace"], rel=1e-9, abs=1e-12)
        if "TICDiag" in names:
            check_first_order(run, step, weight_decay=weight_decay)
            assert_close(run.records[step]["TICDiag"], expected["TICDiag"], rel=1e-8, abs=1e-10)
            assert_close(run.records[step]["TICTrace"], expected["TICTrace"], rel=1e-9, abs=1e-12)


def test_monte_carlo_ggn_of_a_residual_model_leaves_the_random_state_and_in_place_layers_alone() -> None:
    model = ResidualMLP(0, in_place=True)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    run = train(model, make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn_mc")
    assert torch.equal(torch.get_rng_state(), before) and model.relu.inplace
    for step in range(2):
        assert all(math.isfinite(t) and t >= 0.0 for t in run.records[step]["HessTrace"])
        check_first_order(run, step, names=("NormTest",))


class FunctionalReLU(ResidualMLP):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.first(inputs))
        return self.out(hidden + self.squash(self.branch(hidden)))


class FunctionalCNN(torch.nn.Module):
    """Conv2d(2, 3, 3), then in the forward: ``F.relu``, ``h.view(h.size(0), -1)``, Linear(48, 6),
    ``F.relu`` again (a function called twice, which BackPACK's converter could not take),
    ``torch.sin``, ``h.relu_()`` of a tensor read nowhere else, ``h.reshape(h.shape[0], 2, 3).softmax(2)``,
    ``torch.flatten``, Linear(6, 3)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.hidden, self.out = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 6), torch.nn.Linear(6, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        functional = torch.nn.functional
        hidden = functional.relu(self.conv(inputs))
        hidden = torch.sin(functional.relu(self.hidden(hidden.view(hidden.size(0), -1)))).relu_()
        return self.out(torch.flatten(hidden.reshape(hidden.shape[0], 2, 3).softmax(2), 1))


class PooledTokens(torch.nn.Module):
    """Linear(6, 8) as two positions of 4, ``torch.tanh``, the mean over the positions (a tensor
    method), ``F.normalize``, Linear(4, 3)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(4, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.normalize(torch.tanh(self.embed(inputs)).reshape(-1, 2, 4).mean(1), dim=1))


class Positioned(torch.nn.Module):
    """Linear(4, 8) of each of 6 positions plus learned positions (a parameter of the model, read
    in its forward), ``torch.tanh``, minus a buffer, times a learned temperature, Flatten,
    Linear(48, 3); ``tied``: the positions' features are multiplied with the first layer's weight
    too (a tensor a layer holds)."""

    def __init__(self, seed: int, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(48 if not tied else 24, 3)
        self.positions = torch.nn.Parameter(0.5 * torch.randn(1, 6, 8))
        self.temperature = torch.nn.Parameter(torch.tensor([1.5]))
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, 8))
        self.tied = tied
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = (torch.tanh(self.embed(inputs) + self.positions) - self.offset) * self.temperature
        return self.head((hidden @ self.embed.weight if self.tied else hidden).flatten(1))


OPERATION_MODELS = {  # the input's kind, the model, the operations autograd's rules follow (the others: BackPACK's activations)
    "F.relu in a residual network": ("mlp", FunctionalReLU, []),
    "tensor operations in a CNN": ("cnn", FunctionalCNN, ["reshape", "sin", "softmax", "view"]),
    "mean over positions": ("mlp", PooledTokens, ["mean", "normalize", "reshape"]),
    "tensors of the model read in its forward": ("sequences", Positioned, ["add", "mul", "sub"]),
}


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", sorted(OPERATION_MODELS))
def test_operations_of_the_model_s_forward_on_one_tensor_get_exact_curvature_as_layers(name: str, curvature: str) -> None:
    """A model that calls ``torch.relu``, ``h.mean(1)`` or ``h.view(h.size(0), -1)`` in its own
    forward, or reads a parameter there (``h + self.positions``), got no curvature (BackPACK's
    rules follow modules): each such operation is now a layer of the graph (the activations
    BackPACK knows as those layers, the others followed by autograd's rules, their second
    derivatives included, the parameters they hold too), and every diagonal matches the references."""
    from cockpit_cli.instruments.curvature_graph import graph_operations

    from test_instruments_exact import make_batches_of_sequences

    kind, build, followed = OPERATION_MODELS[name]
    batches = make_batches_of_sequences(2) if kind == "sequences" else make_batches(kind, "ce", 0, 2)
    run = train(build(0), batches, quantities(DIAGONAL + ("NormTest",)), curvature=curvature)
    assert run.instruments.unavailable == {}
    assert run.instruments.support.curvature_by_graph and not run.instruments.support.curvature_by_products
    assert sorted(operation.name for operation in graph_operations(run.instruments.support.graph)) == followed
    check_curvature(run, curvature)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))


class CumulativeMLP(ResidualMLP):
    """:class:`ResidualMLP` whose hidden features are summed over the batch's samples (``torch.cumsum`` along dimension 0)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cumsum(self.relu(self.first(inputs)), 0))


class GatedMLP(ResidualMLP):
    """:class:`ResidualMLP` whose hidden features are the elementwise maximum of two layers' (an operation of two tensors)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.first(inputs))
        return self.out(torch.maximum(hidden, self.branch(hidden)))


def test_an_operation_of_the_model_s_forward_that_mixes_the_samples_gets_no_curvature_saying_which() -> None:
    """The rules of an operation's layer hold where it treats every sample alone, as its first
    call checks; and the per-sample gradients torch.func gives at that step (each sample alone) do
    not average to the batch's gradient: that step goes without them."""
    run = train(CumulativeMLP(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert run.instruments.unavailable["HessTrace"] == (
        "failed at step 0 and was switched off: the pass through BackPACK's graph of the model failed: ValueError: the operation 'cumsum' "
        "of the model's forward mixes the samples of a batch (its output on a sample alone is not that sample's row of its output on "
        "the batch), which the curvature's rules cannot follow"
    )
    assert "NormTest" not in run.records.get(0, {})


class InPlaceReLU(ResidualMLP):
    """:class:`ResidualMLP` whose ReLU is ``h.relu_()``, its value read through ``h`` (not the call's result)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.first(inputs)
        hidden.relu_()
        return self.out(hidden + self.squash(self.branch(hidden)))


class DroppingMLP(ResidualMLP):
    """:class:`ResidualMLP` with ``F.dropout`` in its forward (random numbers its layer could not draw again; in eval
    mode here, for the references)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.dropout(self.relu(self.first(inputs)), 0.2, self.training))


class Twice(ResidualMLP):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.first(inputs))
        return self.out(self.branch(self.squash(self.branch(hidden))))


class LoopedMLP(ResidualMLP):
    """:class:`ResidualMLP` whose residual branch runs as often as a size of the input says
    (twice: a loop the converter cannot trace); ``on_values``: the output's sign flips on a
    value of the batch (control flow on tensor values)."""

    def __init__(self, seed: int, on_values: bool = False) -> None:
        super().__init__(seed)
        self.on_values = on_values

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.first(inputs))
        for _ in range(int(inputs.shape[1] // 3)):
            hidden = hidden + self.squash(self.branch(hidden))
        if self.on_values and float(hidden.detach().sum()) < 0:
            hidden = -hidden
        return self.out(hidden)


WHOLE_MODELS = {  # the input's kind and the model, whose forward BackPACK's graph does not follow
    "an operation of two tensors": ("mlp", GatedMLP),
    "dropout by a function, in eval mode": ("mlp", lambda seed: DroppingMLP(seed).eval()),
    "a ReLU in place, read through its input": ("mlp", InPlaceReLU),
    "a layer called twice": ("mlp", Twice),
    "a layer's weight read in the forward (tied)": ("sequences", lambda seed: Positioned(seed, tied=True)),
    "attention to other inputs (a layer of several inputs)": ("sequences", lambda seed: SelfAttending(cross=True)),
    "a loop over a size of the input": ("mlp", LoopedMLP),
    "an nn.Sequential with a layer that keeps a state": ("mlp", lambda seed: offset_mlp(scaled_mlp(seed))),
    "an nn.Sequential with uneven 'same' padding": ("cnn", lambda seed: same_padding_cnn(seed, 2)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", sorted(WHOLE_MODELS))
def test_a_model_backpack_s_graph_cannot_follow_gets_the_ggn_diagonal_through_the_whole_model(name: str) -> None:
    """These models got no GGN diagonal (the converter's graph could not follow their forward, or
    BackPACK's rules a layer of them): a graph of one layer, the whole model, which autograd's
    rules follow, gives it exactly (said in the run's notes), the per-sample values beside it from
    torch.func; the Monte-Carlo GGN too."""
    from cockpit_cli.instruments.curvature_graph import WholeModel, graph_layers

    from test_instruments_exact import make_batches_of_sequences

    kind, build = WHOLE_MODELS[name]
    batches = make_batches_of_sequences(2) if kind == "sequences" else make_batches(kind, "ce", 0, 2)
    model = build(0)
    run = train(model, batches, quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert run.instruments.unavailable == {}
    (layer,) = graph_layers(run.instruments.support.graph)
    assert isinstance(layer, WholeModel) and layer.model is model
    notes = run.instruments.describe()["notes"]
    assert any(note.startswith(f"the GGN diagonal comes from autograd through the whole model {type(model).__name__}, ") for note in notes)
    assert GRAPH_NOTE not in notes  # (the whole model's note says the pass's cost)
    check_curvature(run, "ggn")
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))
    sampled = train(build(0), batches, quantities(DIAGONAL), curvature="ggn_mc")
    assert sampled.instruments.unavailable == {}
    assert all(math.isfinite(value) and value >= 0.0 for step in range(2) for value in sampled.records[step]["HessTrace"])


class ManyClasses(GatedMLP):
    """:class:`GatedMLP` with 40 classes: 39 columns of the cross-entropy's curvature factor."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        torch.manual_seed(seed)
        self.out = torch.nn.Linear(5, 40).double()


def test_the_ggn_through_the_whole_model_is_left_out_where_the_loss_s_factor_has_many_columns() -> None:
    """Each column takes a backward pass per sample (a thousand classes: hours a step): over 32, the
    exact GGN is left out with the reason at its first step; the Monte-Carlo GGN takes one."""
    from cockpit_cli.instruments.curvature_graph import WHOLE_COLUMNS_MOST

    assert WHOLE_COLUMNS_MOST == 32
    run = train(ManyClasses(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert run.instruments.unavailable == dict.fromkeys(DIAGONAL, (
        "the GGN through the whole model ManyClasses would take 39 backward passes per sample at each step with HessTrace or TIC "
        "due, one per column of the loss's curvature factor (at most 32): curvature: ggn_mc takes one"
    ))
    assert all("NormTest" in values for values in run.records.values())
    sampled = train(ManyClasses(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL), curvature="ggn_mc")
    assert sampled.instruments.unavailable == {} and all("HessTrace" in values for values in sampled.records.values())


class WideGatedMLP(torch.nn.Module):
    """Linear(6, 20)-ReLU, the elementwise maximum of that and Linear(20, 20) of it (an operation
    of two tensors), Linear(20, 3): 623 parameters, too many for a Hessian diagonal from products."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.branch, self.out = torch.nn.Linear(6, 20), torch.nn.Linear(20, 20), torch.nn.Linear(20, 3)
        self.double()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.first(inputs))
        return self.out(torch.maximum(hidden, self.branch(hidden)))


def test_a_model_backpack_s_graph_cannot_follow_gets_no_hessian_diagonal_saying_why() -> None:
    """The whole model's Hessian would take a Hessian-vector product per parameter: a model too
    large for the products gets no Hessian diagonal, with the reason (``curvature: ggn`` gives
    the GGN's)."""
    run = train(WideGatedMLP(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="hessian")
    reason = "the model WideGatedMLP computes 'maximum' outside a module, which BackPACK's curvature rules cannot follow"
    assert run.instruments.unavailable == dict.fromkeys(DIAGONAL, reason)
    for step in range(2):
        check_first_order(run, step, names=("NormTest",))


class GatedByInput(GatedMLP):
    """:class:`GatedMLP` of two inputs, the second scaling the first."""

    def forward(self, inputs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs * scale)


def test_a_model_of_two_inputs_is_no_layer_the_rules_follow_whole() -> None:
    from cockpit_cli.instruments.support import check_support

    support = check_support(GatedByInput(0), torch.nn.CrossEntropyLoss(), "ggn")
    assert not support.curvature
    assert support.curvature_reason == "the model GatedByInput computes 'maximum' outside a module, which BackPACK's curvature rules cannot follow"


def test_a_whole_model_with_control_flow_on_tensor_values_gets_no_curvature_saying_why() -> None:
    """``vmap`` cannot run it a sample at a time: the first step's pass fails with torch's reason."""
    run = train(LoopedMLP(0, on_values=True), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert run.instruments.unavailable["HessTrace"].startswith(
        "failed at step 0 and was switched off: the pass through BackPACK's graph of the model failed: RuntimeError: vmap: It looks like you're"
    )
    assert all("NormTest" in values for values in run.records.values())


def test_a_whole_model_that_draws_random_numbers_gets_no_curvature_saying_so() -> None:
    """Dropout by a function in training mode: the whole model's rules would compute it again
    with other masks; its first call sees another output on the same batch."""
    run = train(DroppingMLP(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest",)), curvature="ggn")
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert run.instruments.unavailable["HessTrace"] == (
        "failed at step 0 and was switched off: the pass through BackPACK's graph of the model failed: ValueError: the model "
        "DroppingMLP draws random numbers (dropout in its forward?), which the curvature's rules cannot draw again"
    )
    assert all("NormTest" in values for values in run.records.values())


def output_penalty(outputs: torch.Tensor) -> torch.Tensor:
    """A term of the outputs added to the loss, each sample's share its own: 0.1 * mean(o^2)."""
    return 0.1 * outputs.pow(2).mean()


def with_output_penalty(batch: ref.Batch) -> ref.Batch:
    """``batch`` whose per-sample losses include their share of :func:`output_penalty`."""
    return batch._replace(per_sample_loss_fn=lambda o, t, f=batch.per_sample_loss_fn: f(o, t) + 0.1 * o.pow(2).mean(1))


def test_a_loss_with_a_term_of_its_own_switches_the_graph_s_curvature_off_and_skips_a_step_s_per_sample_values() -> None:
    """The graph's pass computes the loss module's value times its factor; a loss with a term the
    module does not compute would get that curvature: it is switched off with both values. The
    step's per-sample gradients then come from torch.func, whose per-sample loss function misses
    the term too (their mean is not the step's gradient): that step goes without per-sample
    values; the layers' hooks, which follow the whole loss, give them at the next steps."""
    names = DIAGONAL + ("NormTest", "InnerTest", "MeanGSNR")
    run = train(ResidualMLP(0), make_batches("mlp", "ce", 0, 3), quantities(names), curvature="ggn", output_term=output_penalty)
    reason = run.instruments.unavailable["HessTrace"]
    assert set(run.instruments.unavailable) == set(DIAGONAL)
    assert reason.startswith("failed at step 0 and was switched off: the loss backpropagated (") and "is not 1 times the loss module's value (CrossEntropyLoss, " in reason
    assert not set(names) & set(run.records.get(0, {}))
    (skipped,) = [change for change in run.instruments.changes if change.startswith("at step 0: ")]
    assert skipped.startswith("at step 0: NormTest, InnerTest, MeanGSNR left out: the per-sample gradients of the per-sample loss function (by torch.func) do not average")
    run.batches = [with_output_penalty(batch) for batch in run.batches]
    for step in (1, 2):
        check_first_order(run, step, names=("NormTest", "InnerTest", "MeanGSNR"))


def test_a_loss_with_a_term_torch_func_cannot_see_switches_its_per_sample_values_off_saying_why() -> None:
    """A layer without BackPACK rules: torch.func gives every step's per-sample gradients, of the
    per-sample loss function alone; a loss with a term of its own (of the outputs) would get
    values of another loss."""
    run = train(scaled_mlp(0), make_batches("mlp", "ce", 0, 2), quantities(("NormTest", "GradNorm")), output_term=output_penalty)
    reason = run.instruments.unavailable["NormTest"]
    assert set(run.instruments.unavailable) == {"NormTest"}
    assert reason.startswith("failed at step 0 and was switched off: the per-sample gradients of the per-sample loss function (by torch.func) do not average to the step's gradient (they differ by ")
    assert all("GradNorm" in values for values in run.records.values())


def test_a_graph_whose_layers_are_copies_gives_no_curvature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph must call the model's own layers: the curvature of copies would describe other tensors."""
    import copy

    from backpack.custom_module import graph_utils

    from cockpit_cli.instruments import curvature_graph

    convert = graph_utils.convert_module_to_backpack
    monkeypatch.setattr(curvature_graph, "convert_module_to_backpack", lambda model, debug: convert(copy.deepcopy(model), debug))
    graph, reason = curvature_graph.curvature_graph(ResidualMLP(0), "ggn")
    assert graph is None and reason == "BackPACK's converter copies a layer of the model ResidualMLP, whose copy the curvature would describe"


def test_a_failed_pass_through_the_graph_switches_off_the_curvature_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.instruments import backend

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("no rule for this operation")

    monkeypatch.setattr(backend, "loss_at", failing)  # only the graph's pass computes the loss again here
    run = train(ResidualMLP(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL + ("NormTest", "GradNorm", "UpdateSize")), curvature="ggn")
    reason = "failed at step 0 and was switched off: the pass through BackPACK's graph of the model failed: RuntimeError: no rule for this operation"
    assert run.instruments.unavailable == dict.fromkeys(DIAGONAL, reason)
    for step in range(2):
        check_first_order(run, step, names=("NormTest", "GradNorm", "UpdateSize"))  # the training's step as without instruments


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", list(RESIDUAL))
def test_alpha_at_steps_whose_values_come_from_the_graph_s_pass(kind: str, optimizer: str) -> None:
    """Alpha's products with the last update (and, for SGD, with the mean gradient) at a step
    whose per-sample values all come from the pass through BackPACK's graph."""
    from test_instruments_alpha import OPTIMIZERS, reference_alpha

    run = train(RESIDUAL[kind](0), make_batches(kind, "ce", 0, 3), quantities(("Alpha", "HessTrace")), OPTIMIZERS[optimizer], DECAY, curvature="ggn")
    assert run.instruments.unavailable == {}
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, DECAY), rel=1e-6, abs=1e-8)


def test_a_data_parallel_run_of_a_residual_model_gets_no_curvature_saying_why() -> None:
    """The graph's pass would run the layers outside the data-parallel wrapper; the instruments
    decide at attach time, before any collective operation."""
    from cockpit_cli.instruments.support import GRAPH_IN_PARALLEL
    from cockpit_cli.instruments.sync import Synchronizer

    class TwoProcesses(Synchronizer):
        world_size = 2

    model = ResidualMLP(0)
    instruments = Instruments(
        model, torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(model.parameters(), lr=0.1),
        quantities(DIAGONAL + ("NormTest",)), curvature="ggn", sync=TwoProcesses(),
    )  # fmt: skip
    assert instruments.unavailable == dict.fromkeys(DIAGONAL, GRAPH_IN_PARALLEL.format(name="ResidualMLP"))
    assert not instruments.support.curvature_by_graph and "NormTest" not in instruments.unavailable


def test_the_model_is_converted_once_when_the_instruments_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.instruments import curvature_graph

    calls = []
    convert = curvature_graph.convert_module_to_backpack
    monkeypatch.setattr(curvature_graph, "convert_module_to_backpack", lambda model, debug: calls.append(model) or convert(model, debug))
    run = train(ResidualMLP(0), make_batches("mlp", "ce", 0, 2), quantities(DIAGONAL), curvature="ggn")
    assert len(calls) == 1 and run.instruments.support.curvature_by_graph


def test_a_layer_whose_settings_backpack_s_curvature_rule_does_not_cover_is_named_up_front() -> None:
    """Batch norm without an affine map in eval mode: BackPACK's rule raised inside the backward
    pass, which was reported as a loss not computed by the loss module. (Too large for the
    Hessian's products; the GGN's diagonal comes through the whole model, exactly.)"""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.BatchNorm1d(40, affine=False), nn.Linear(40, 3)).double().eval()
    run = train(copy.deepcopy(model), make_batches("mlp", "ce", 0, 2), quantities(("GradNorm", "HessTrace")), curvature="hessian")
    assert run.instruments.unavailable == {"HessTrace": "layer '1' (BatchNorm1d) has settings BackPACK's curvature rule does not cover (Only implemented for affine=True)"}
    assert all("GradNorm" in run.records[step] for step in range(2))
    whole = train(model, make_batches("mlp", "ce", 0, 2), quantities(("GradNorm", "HessTrace")), curvature="ggn")
    assert whole.instruments.unavailable == {}
    for step in range(2):
        inputs, targets, loss_fn, _ = whole.batches[step]
        assert_close(whole.records[step]["HessTrace"], curv.hess_trace(curv.ggn_diagonal(whole.reference_model(step), loss_fn, inputs, targets)), rel=1e-9, abs=1e-12)
