"""Alpha against ``reference_curvature.reference_alpha`` over consecutive steps.

Alpha of step t fits a quadratic to the losses and slopes at theta_t (batch t) and theta_{t+1}
(batch t+1) along the update. For plain SGD the engine gets the start slopes from the per-sample
dot products with the gradient; for any other optimizer from one forward-mode pass at theta_t on
batch t, which must see the same dropout masks as that step's training forward.

Dropout masks in the references: the CPU random state is saved right before every training
forward (``Run.rng_states``). Restoring it and calling ``F.dropout`` on a tensor of ones of the
dropout input's shape draws exactly the training forward's mask (the first random draw of that
forward). The reference model reads the mask as extra input columns, so the brute-force
per-sample loops of ``reference`` apply it sample by sample.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import reference as ref
import reference_curvature as curv
from cockpit_cli.instruments import QUANTITIES, Instruments, Schedule
from cockpit_cli.instruments.quantities.alpha import fit_alpha
from test_instruments_exact import (  # noqa: F401 (one_thread is a fixture)
    BUILDERS,
    CASES,
    DECAY,
    LR,
    N,
    OptimizerFactory,
    Run,
    dropout_mlp,
    load,
    make_batches,
    one_thread,
    quantities,
    scaled_dropout_mlp,
    scaled_mlp,
    sgd,
    snapshot,
    train,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": sgd,
    "momentum": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05),
}
DROPOUT = 0.3
HIDDEN = 5  # width of the dropout layer's input in ``dropout_mlp``


def reference_alpha(
    run: Run, step: int, weight_decay: float = 0.0, model: nn.Module | None = None, batches: list[ref.Batch] | None = None
) -> float:
    """Brute-force Alpha of ``step`` (needs theta and batch of ``step`` and ``step + 1``)."""
    model = model if model is not None else run.reference_model(step)
    batches = batches if batches is not None else run.batches
    decayed = ref.weights(model) if weight_decay else None
    return curv.reference_alpha(
        model, batches[step].per_sample_loss_fn, batches[step], batches[step + 1], run.thetas[step], run.thetas[step + 1], decayed, weight_decay
    )


class Attention(nn.Module):
    """Linear(6, 8) as two tokens of 4 features, torch's scaled_dot_product_attention over them,
    Linear(8, 3): an operation without a forward-mode derivative (on the CPU)."""

    def __init__(self, seed: int, skipped: bool = False, shifted: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.out = nn.Linear(6, 8).double(), nn.Linear(8, 3).double()
        if skipped:  # a layer the forward pass does not run: only the regulariser moves it
            self.skipped = nn.Linear(3, 3).double()
        # a parameter of the container, outside every layer: per-sample gradients from torch.func
        self.shift = nn.Parameter(torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)) if shifted else None

    def forward(self, inputs: Tensor) -> Tensor:
        tokens = torch.tanh(self.embed(inputs)).reshape(-1, 1, 2, 4)
        outputs = self.out(nn.functional.scaled_dot_product_attention(tokens, tokens, tokens).reshape(-1, 8))
        return outputs if self.shift is None else outputs + self.shift


@pytest.mark.parametrize("shifted", [False, True], ids=["hooks", "torch-func"])
@pytest.mark.parametrize("seed, weight_decay, skipped", [(0, 0.0, False), (1, DECAY, False), (1, DECAY, True)])
def test_alpha_s_start_slopes_without_forward_mode_come_from_a_backward_pass(seed: int, weight_decay: float, skipped: bool, shifted: bool) -> None:
    """With an optimizer other than SGD, Alpha's slopes at the start come from a forward-mode pass
    along the update; where the model has an operation without one (attention on the CPU, as in
    transformers trained with AdamW), a forward and a backward pass at the start, with the
    layers' hooks taking the products, or, for a model whose per-sample gradients come from
    torch.func, those gradients at the start times the update (Alpha failed at the first step)."""
    model = Attention(seed, skipped, shifted)
    batches = make_batches("mlp", "ce", seed, 3)
    with pytest.raises(NotImplementedError):  # the premise: no forward-mode derivative
        with torch.autograd.forward_ad.dual_level():
            tokens = torch.autograd.forward_ad.make_dual(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
            nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
    run = train(model, batches, quantities(("Alpha", "Loss")), OPTIMIZERS["adam"], weight_decay)
    assert run.instruments.unavailable == {} and not run.instruments.plain_sgd
    assert run.instruments.support.per_sample == ("functorch" if shifted else "backpack")
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, weight_decay), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("model", ["forward mode", "hooks", "torch-func"])
def test_alpha_of_a_loss_module_s_output_times_a_factor(model: str) -> None:
    """``0.5 * loss_fn(outputs, targets)`` backpropagated: Alpha's losses, their spread and its
    slopes at the start (by forward mode, by the layers' hooks or by torch.func) are all the
    weighted loss's (its losses were the module's, its slopes the weighted loss's: another alpha)."""
    build = {"forward mode": lambda: ref.mlp(0), "hooks": lambda: Attention(0), "torch-func": lambda: Attention(0, shifted=True)}[model]
    run = train(build(), make_batches("mlp", "ce", 0, 3), quantities(("Alpha", "Loss")), OPTIMIZERS["adam"], loss_weight=0.5)
    assert run.instruments.unavailable == {}
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)  # (the same for any factor)


class RecurrentPair(nn.Module):
    """A GRU, then an LSTM (float32: on the CPU, its fused kernel), then a linear head on the last
    state: ``vmap`` cannot run the GRU a sample at a time, and neither layer has a forward-mode
    derivative, so Alpha's start slopes come from the batch's Jacobian by torch.func."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru, self.lstm, self.head = nn.GRU(4, 4, batch_first=True), nn.LSTM(4, 3, batch_first=True), nn.Linear(3, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.lstm(self.gru(inputs)[0])[0][:, -1])


def test_alpha_of_an_lstm_in_float32_from_torch_func_s_jacobian() -> None:
    """The Jacobian, taken where the quantities compute (under no_grad), ran the LSTM's fused kernel
    without what its backward pass needs: Alpha failed at step 0."""
    generator = torch.Generator().manual_seed(0)
    batches = [ref.Batch(torch.randn(6, 5, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator), *ref.loss_functions("ce")) for _ in range(3)]
    run = train(RecurrentPair(), batches, quantities(("Alpha", "Loss")), OPTIMIZERS["adam"])
    assert run.instruments.unavailable == {} and run.instruments.support.per_sample == "functorch"
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("seed, weight_decay", [(0, 0.0), (1, DECAY)])
@pytest.mark.parametrize("kind, loss", CASES)
def test_alpha_matches_reference(kind: str, loss: str, seed: int, weight_decay: float, optimizer: str) -> None:
    run = train(BUILDERS[kind](seed), make_batches(kind, loss, seed, 3), quantities(("Alpha", "Loss")), OPTIMIZERS[optimizer], weight_decay)
    assert run.instruments.plain_sgd == (optimizer == "sgd")
    assert run.instruments.unavailable == {}
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, weight_decay), rel=1e-6, abs=1e-8)
    assert set(run.records[2]) == {"Loss"}  # step 2's Alpha needs step 3


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_alpha_of_sgd_that_trains_some_of_the_parameters(kind: str) -> None:
    """SGD of the last layer alone, the others requiring gradients all the same: their update is
    zero, not -lr g, so the plain-SGD shortcut does not hold (it gave 0.141 for 0.143 here) and
    CABS and EB, defined for SGD of every parameter, say which parameter it leaves out."""
    run = train(BUILDERS[kind](0), make_batches(kind, "ce", 0, 3), quantities(("Alpha", "CABS")), lambda params: torch.optim.SGD(params[-2:], lr=LR))
    assert not run.instruments.plain_sgd
    assert "in no parameter group" in run.instruments.unavailable["CABS"] and "'0.weight'" in run.instruments.unavailable["CABS"]
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)


CLIPPING = {
    "by norm": lambda params: torch.nn.utils.clip_grad_norm_(params, 0.05),
    "by value": lambda params: torch.nn.utils.clip_grad_value_(params, 0.01),
    "by a new tensor": lambda params: [setattr(p, "grad", p.grad.clamp(-0.01, 0.01)) for p in params],
    "by a scale": lambda params: None,  # run.backward(..., scale=0.5): the update is -lr g / 2
    "not at all": lambda params: None,
}


@pytest.mark.parametrize("clip", list(CLIPPING))
@pytest.mark.parametrize("builder", [ref.mlp, ref.cnn, scaled_mlp], ids=["mlp", "cnn", "functorch"])
def test_alpha_of_plain_sgd_with_clipped_gradients(builder: Callable[[int], nn.Sequential], clip: str) -> None:
    """Gradients clipped between the backward pass and the update: plain SGD steps -lr times the
    clipped gradient, not the backward pass's (Alpha was 0.013 for 0.164 clipped by norm). Its
    start slopes then come from a forward-mode pass along the update; unclipped, from the dot
    products of the backward pass (no forward-mode pass is made)."""
    kind = "cnn" if builder is ref.cnn else "mlp"
    model = builder(0)
    batches = make_batches(kind, "ce", 0, 3)
    run = Run({}, [], batches, [], copy.deepcopy(model), None)
    opt = sgd(ref.trainable(model))
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(("Alpha",)))
    passes = []
    original = instruments.capture.start_slopes
    instruments.capture.start_slopes = lambda *args: (lambda slopes: (lambda d: passes.append(1) or slopes(d)))(original(*args))
    for step, batch in enumerate(batches):
        run.thetas.append(snapshot(model))
        opt.zero_grad()
        outputs = model(batch.inputs)
        instruments.backward(step, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets, scale=0.5 if clip == "by a scale" else 1.0)
        CLIPPING[clip](ref.trainable(model))
        opt.step()
        instruments.after_update(step)
        run.records.update(instruments.completed(step))
    run.thetas.append(snapshot(model))
    assert instruments.plain_sgd
    assert len(passes) == (0 if clip == "not at all" else 3)  # one at each step's start, where clipped
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("builder", [ref.mlp, scaled_mlp, scaled_dropout_mlp], ids=["backpack", "functorch", "functorch with dropout"])
def test_per_sample_losses_of_every_output_element_are_averaged_per_sample(builder: Callable[[int], nn.Sequential]) -> None:
    """``nn.MSELoss(reduction="none")`` gives ``[N, K]``, one loss per output element: Alpha read
    it beside ``[N]`` vectors and failed, and torch.func summed a sample's elements (gradients K
    times too large). A sample's elements are averaged, as the mean reduction does."""
    batches = make_batches("mlp", "mse", 0, 3)
    elementwise = [batch._replace(per_sample_loss_fn=nn.MSELoss(reduction="none")) for batch in batches]
    names = ("Alpha", "NormTest", "GradHist1d")
    torch.manual_seed(0)  # the same dropout masks in both runs
    run = train(builder(0), elementwise, quantities(names))
    assert run.instruments.unavailable == {} and run.instruments.support.per_sample == ("backpack" if builder is ref.mlp else "functorch")
    torch.manual_seed(0)
    same = train(builder(0), batches, quantities(names))  # ref.mse_per_sample: [N] already
    for step in (0, 1):
        assert run.records[step] == same.records[step]
        if builder is not scaled_dropout_mlp:  # (the reference draws no masks)
            assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(same, step), rel=1e-6, abs=1e-8)


def test_a_per_sample_loss_function_that_reduces_switches_alpha_off_saying_so() -> None:
    batches = [batch._replace(per_sample_loss_fn=nn.MSELoss()) for batch in make_batches("mlp", "mse", 0, 2)]
    run = train(ref.mlp(0), batches, quantities(("Alpha", "NormTest")))
    assert "the per-sample loss function returned a scalar" in run.instruments.unavailable["Alpha"] and "reduction='none'" in run.instruments.unavailable["Alpha"]
    assert "NormTest" in run.records[1]


@pytest.mark.parametrize("builder", [ref.mlp, scaled_mlp], ids=["backpack", "functorch"])
def test_a_per_sample_loss_over_flattened_elements_switches_off_what_reads_it_saying_so(builder: Callable[[int], nn.Sequential]) -> None:
    """One loss per output element, flattened (as for a sequence's tokens), would give Alpha the
    spread of N K values and torch.func each sample's summed losses (K times its gradient)."""

    def flattened(outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs, targets, reduction="none").flatten()

    batches = [batch._replace(per_sample_loss_fn=flattened) for batch in make_batches("mlp", "mse", 0, 2)]
    run = train(builder(0), batches, quantities(("Alpha", "NormTest", "GradNorm")))
    reason = f"the per-sample loss function returned {N * ref.NUM_OUTPUTS} values for a batch of {N}, not one loss per sample"
    assert reason in run.instruments.unavailable["Alpha"] and "losses.view(len(outputs), -1).mean(1)" in run.instruments.unavailable["Alpha"]
    if builder is scaled_mlp:  # a sample at a time: its K values
        assert f"returned {ref.NUM_OUTPUTS} values for a batch of 1" in run.instruments.unavailable["NormTest"]
    else:  # the hooks read the loss's output gradients
        assert "NormTest" in run.records[1]
    assert "GradNorm" in run.records[1]


@pytest.mark.parametrize("builder", [ref.mlp, scaled_mlp], ids=["backpack", "functorch"])
def test_alpha_on_a_schedule(builder: Callable[[int], nn.Sequential]) -> None:
    """Tracked at 0 and 2: each value arrives one step later, and nothing is stored for step 1.
    Steps 1 and 3 need only the slopes at the end points (one forward-mode pass where the
    per-sample gradients come from torch.func)."""
    tracked = [quantities(("Alpha",), Schedule(every=2))[0]]
    run = train(builder(0), make_batches("mlp", "ce", 0, 4), tracked, OPTIMIZERS["momentum"])
    assert run.instruments.support.per_sample == ("backpack" if builder is ref.mlp else "functorch")
    assert sorted(run.records) == [0, 2]
    assert run.completed_keys == [[], [0], [], [2]]
    for step in (0, 2):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)
    assert tracked[0].state_dict() == {"start": None, "pending": None}  # no copy of the last update is kept once its value is out


def test_alpha_of_a_step_that_does_not_move_is_minus_one() -> None:
    """With a learning rate of 0 the update is zero: no progress, -1 (as the reference says)."""
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 3), quantities(("Alpha",)), lambda params: torch.optim.SGD(params, lr=0.0))
    assert run.instruments.plain_sgd
    assert [run.records[step]["Alpha"] for step in (0, 1)] == [-1.0, -1.0]
    assert reference_alpha(run, 0) == -1.0


def test_alpha_of_a_step_into_non_finite_losses_is_nan() -> None:
    """A step that made the parameters NaN has no fit: NaN, where it gave -1 (which reads as 'the
    learning rate is too small' and raised that diagnosis on a diverged run)."""
    run = train(ref.mlp(0), make_batches("mlp", "ce", 0, 3), quantities(("Alpha",)), lambda params: torch.optim.SGD(params, lr=math.nan))
    assert [math.isnan(run.records[step]["Alpha"]) for step in (0, 1)] == [True, True]
    for observations in [(math.nan, (1.0, 0.8)), (0.5, (1.0, math.nan)), (0.5, (1.0, math.inf))]:
        assert math.isnan(fit_alpha(observations[0], observations[1], (-0.9, 0.1), (0.3, 0.2), (0.05, 0.07)))
    assert math.isnan(fit_alpha(0.5, (1.0, 0.8), (-0.9, 0.1), (0.3, math.nan), (0.05, 0.07)))


def test_alpha_is_next_active_exactly_where_it_is_active() -> None:
    """``next_active`` agrees with ``is_active``: scheduled steps and, with a pending value, the
    step that completes it."""
    alpha = QUANTITIES["Alpha"](Schedule(every=4, offset=1))
    for pending in (None, {"step": 5}, {"step": 3}):
        alpha.load_state_dict({"start": None, "pending": pending})
        for step in range(16):
            expected = next(s for s in range(step, 40) if alpha.is_active(s))
            assert alpha.next_active(step) == expected, (pending, step)
    assert [s for s in range(8) if alpha.is_active(s)] == [1, 4, 5]  # 4 completes the value pending from 3


@pytest.mark.parametrize(
    "t, fs, dfs, var_fs, var_dfs",
    [
        (0.5, (1.0, 0.8), (-0.9, 0.1), (0.3, 0.2), (0.05, 0.07)),  # convex, landed just past the minimum
        (0.1, (2.0, 1.99), (-0.2, -0.15), (1e-3, 4.0), (2.0, 1e-4)),  # weights of very different sizes
        (1.0, (1.0, 0.5), (-1.0, 0.2), (0.0, 0.1), (0.3, 0.0)),  # zero variances among others: taken as 1e-10
        (0.4, (1.0, 0.7), (-1.2, 0.3), (0.2, 0.0), (0.5, 0.1)),
        (0.2, (1.0, 0.9), (-0.6, -0.4), (0.0, 0.0), (0.0, 0.0)),  # all zero: equal weights
        (0.3, (1.0, 1.2), (0.5, -0.5), (0.1, 0.1), (0.1, 0.1)),  # concave: -1
    ],
)
def test_fit_alpha_matches_the_weighted_least_squares_reference(
    t: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float], var_dfs: tuple[float, float]
) -> None:
    """The fit's normal equations against a least-squares solve weighted by the inverse variances."""
    assert fit_alpha(t, fs, dfs, var_fs, var_dfs) == pytest.approx(curv.alpha_from_observations(t, fs, dfs, var_fs, var_dfs), rel=1e-6)


def test_fit_alpha_of_a_line_and_of_a_step_from_the_minimum() -> None:
    """A fit that is flat along d (``mu2 = 0``: still going downhill) gives -1; one whose minimum
    is the start (``mu1 = 0``) is infinitely far past it."""
    assert fit_alpha(1.0, (1.0, 0.0), (-1.0, -1.0), (1.0, 1.0), (1.0, 1.0)) == -1.0  # f = 1 - x, exactly
    assert fit_alpha(1.0, (0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (1.0, 1.0)) == -1.0  # constant
    assert fit_alpha(1.0, (0.0, 1.0), (0.0, 2.0), (1.0, 1.0), (1.0, 1.0)) == math.inf  # f = x^2


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_alpha_s_second_point_alone_takes_each_layer_s_products_in_one_pass(kind: str, weight_decay: float, optimizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alpha every other step: at steps 1 and 3 its end products are all the step needs, and
    each layer's come from one pass of the layer with the direction (``layer_products``, weight
    and bias together, the regulariser's term added), exact against the reference."""
    from cockpit_cli.instruments import backend

    taken: list[int] = []
    layer_products = backend.layer_products

    def spied(module: nn.Module, *args: Tensor | None) -> Tensor:
        taken.append(id(module))
        return layer_products(module, *args)

    monkeypatch.setattr(backend, "layer_products", spied)
    tracked = [quantities(("Alpha",), Schedule(every=2))[0]]
    run = train(BUILDERS[kind](0), make_batches(kind, "ce", 0, 4), tracked, OPTIMIZERS[optimizer], weight_decay)
    assert run.instruments.unavailable == {}
    layers = [m for m in run.instruments.capture.module_params]
    assert len(taken) == 2 * len(layers) and set(taken) == {id(m) for m in layers}  # once per layer at steps 1 and 3
    for step in (0, 2):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, weight_decay), rel=1e-6, abs=1e-8)


class MaskedDropoutMLP(nn.Module):
    """``dropout_mlp`` with its dropout mask read from the input columns after the features.

    Args:
        model: A ``dropout_mlp``; its layers (and trainable parameters, in order) are shared.
    """

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.net = model

    def forward(self, inputs: Tensor) -> Tensor:
        features, mask = inputs[:, :-HIDDEN], inputs[:, -HIDDEN:]
        hidden = self.net[1](self.net[0](features)) * mask
        for layer in list(self.net)[3:]:
            hidden = layer(hidden)
        return hidden


def dropout_mask(rng_state: Tensor) -> Tensor:
    """The mask ``[N, HIDDEN]`` (entries 0 or 1 / (1 - p)) the forward from ``rng_state`` draws."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        return nn.functional.dropout(torch.ones(N, HIDDEN, dtype=torch.float64), DROPOUT, training=True)


def masked_batches(run: Run) -> list[ref.Batch]:
    """The run's batches with every step's dropout mask appended to the inputs."""
    return [batch._replace(inputs=torch.cat([batch.inputs, dropout_mask(state)], dim=1)) for batch, state in zip(run.batches, run.rng_states)]


def record_dropout(model: nn.Sequential) -> list[tuple[Tensor, Tensor]]:
    """Record (input, output) of the dropout layer in every training forward (not the engine's)."""
    seen: list[tuple[Tensor, Tensor]] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(output):
            seen.append((args[0].detach(), output.detach()))

    model[2].register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("builder", [dropout_mlp, scaled_dropout_mlp], ids=["backpack", "functorch"])
def test_alpha_with_dropout_uses_the_training_masks(builder: Callable[[int], nn.Sequential], loss: str, optimizer: str) -> None:
    """Start slopes (forward mode), end slopes and NormTest all see each step's training masks."""
    model = builder(0)
    seen = record_dropout(model)
    torch.manual_seed(123)
    run = train(model, make_batches("mlp", loss, 0, 3), quantities(("Alpha", "NormTest")), OPTIMIZERS[optimizer])
    batches = masked_batches(run)
    assert len(seen) == 3
    for (dropout_in, dropout_out), batch in zip(seen, batches):  # the masks are the training forward's
        assert torch.equal(dropout_out, dropout_in * batch.inputs[:, -HIDDEN:])
    masked = MaskedDropoutMLP(copy.deepcopy(run.pristine))
    for step in (0, 1):
        expected = reference_alpha(run, step, model=masked, batches=batches)
        assert run.records[step]["Alpha"] == pytest.approx(expected, rel=1e-6, abs=1e-8)
        inputs, targets, _, per_sample = batches[step]
        load(masked, run.thetas[step])
        grads = ref.per_sample_gradients(masked, per_sample, inputs, targets)
        assert run.records[step]["NormTest"] == pytest.approx(ref.norm_test(grads), rel=1e-9)


def exact_alpha(t: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float], var_dfs: tuple[float, float]) -> float:
    """Alpha of the weighted least-squares fit in exact rational arithmetic (the normal equations,
    solved by elimination without rounding)."""
    from fractions import Fraction

    length = Fraction(t)
    weights = [1 / Fraction(v if v != 0.0 else 1e-10) for v in (*var_fs, *var_dfs)]
    design = [[Fraction(1), Fraction(0), Fraction(0)], [Fraction(1), length, length**2], [Fraction(0), Fraction(1), Fraction(0)], [Fraction(0), Fraction(1), 2 * length]]
    values = [Fraction(v) for v in (*fs, *dfs)]
    rows = [[sum(w * d[i] * d[j] for w, d in zip(weights, design)) for j in range(3)] + [sum(w * d[i] * y for w, d, y in zip(weights, design, values))] for i in range(3)]
    for col in range(3):
        for row in range(col + 1, 3):
            factor = rows[row][col] / rows[col][col]
            rows[row] = [a - factor * b for a, b in zip(rows[row], rows[col])]
    mu2 = rows[2][3] / rows[2][2]
    mu1 = (rows[1][3] - rows[1][2] * mu2) / rows[1][1]
    return -1.0 if mu2 <= 0 else float(2 * length / (-mu1 / mu2) - 1)


def test_fit_alpha_is_exact_where_a_variance_is_near_zero() -> None:
    """Slopes that hardly differ between samples at the end point (a variance of 1.6e-13, a weight
    of 6e12; seen on a network whose last layer norm has two features): the normal equations,
    solved in floating point, lost four digits (0.124099 for 0.124140)."""
    observations = (0.22032352329391594, (2.5796465173984156, 0.2952701528120296), (-2.6775442309435773, 0.7069990205628444), (0.027727820926066776, 5.498143181383756e-10), (0.43780656596730716, 1.6346656382049034e-13))
    assert fit_alpha(*observations) == pytest.approx(exact_alpha(*observations), rel=1e-13)


def test_fit_alpha_matches_the_exact_fit_over_many_observations() -> None:
    """Random observations with variances from 1e-8 to 10 and zeros among them."""
    generator = random.Random(0)
    for _ in range(300):
        variances = [generator.choice([0.0, 10 ** generator.uniform(-8, 1)]) for _ in range(4)]
        observations = (generator.uniform(0.01, 3.0), (generator.gauss(0, 1), generator.gauss(0, 1)), (generator.gauss(0, 1), generator.gauss(0, 1)), tuple(variances[:2]), tuple(variances[2:]))
        expected = exact_alpha(*observations)
        assert fit_alpha(*observations) == pytest.approx(expected, rel=1e-9, abs=1e-12), observations
