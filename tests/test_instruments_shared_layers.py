"""Models whose parameters serve more than one place, or none, against the brute-force references
(with frozen layers, a parametrized weight and activation checkpointing beside them).

A layer that runs twice in a forward pass (a block applied again, a recurrence written as a
loop), layers that share a weight (tied embeddings) and a layer the forward pass skips are where
per-sample gradients are easy to get wrong: every run adds its part to each sample's gradient,
and a parameter the loss does not use has the regulariser's gradient alone (zero without one),
as autograd and torch.func give it. The references loop over the samples with autograd.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import reference as ref
from cockpit_cli.instruments import Instruments, Schedule, engine
from cockpit_cli.instruments.support import check_support, shared_parameters
from test_instruments_alpha import reference_alpha
from test_instruments_curvature import dense_max_eigenvalue
from test_instruments_exact import DECAY, FIRST_ORDER, SGDAccumulating, check_first_order, check_hist1d, engine_step, histogram_options, load, make_batches, one_thread, quantities, snapshot, train  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


class LinearTwice(nn.Module):
    """Linear(6, 6) applied twice, then Linear(6, 3): [N, 6] -> [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.block(torch.tanh(self.block(x)))))


class ConvTwice(nn.Module):
    """Conv2d(2, 2, 3, padding=1) applied twice, then Linear(8, 3): [N, 2, 6, 6] -> [N, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.pool, self.out = nn.Conv2d(2, 2, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.pool(torch.tanh(self.block(torch.tanh(self.block(x))))).flatten(1))


class TiedLinears(nn.Module):
    """Linear(6, 4) and Linear(4, 6) whose weights are one matrix (transposed), then Linear(6, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode, self.decode, self.out = nn.Linear(6, 4), nn.Linear(4, 6, bias=False), nn.Linear(6, 3)
        self.decode.weight = self.encode.weight  # decode uses it as x @ W: see forward

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(self.encode(x))
        return self.out(torch.tanh(nn.functional.linear(hidden, self.decode.weight.T)))


class SharedLinears(nn.Module):
    """Two Linear(6, 6) layers with one weight and bias, then Linear(6, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.second.weight, self.second.bias = self.first.weight, self.first.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


class EmbeddingTwice(nn.Module):
    """Embedding(12, 4) of two tokens per sample, then Linear(8, 3): the hooks add up its runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(12, 4), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = (x[:, :2].abs() * 4).long().clamp(max=11)
        return self.out(torch.tanh(torch.cat([self.embed(tokens[:, 0]), self.embed(tokens[:, 1])], dim=1)))


class TransposedTwice(nn.Module):
    """ConvTranspose1d(1, 2, 2) of both halves of the input, then Linear(16, 3): a layer with
    BackPACK's rule and no hooks, whose second run only the forward pass shows."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.out = nn.ConvTranspose1d(1, 2, 2), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        halves = [self.up(half.unsqueeze(1)).flatten(1) for half in (x[:, :3], x[:, 3:])]
        return self.out(torch.tanh(torch.cat(halves, dim=1)))


class SkippedLayer(nn.Module):
    """Linear(6, 5)-Tanh-Linear(5, 3), a Linear(3, 3) the forward pass skips, and a frozen weight."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.out, self.skipped = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 3)
        self.first.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.first(x)))


class LowRankAdapter(nn.Module):
    """A frozen Linear(6, 5) with a trained low-rank update B A beside it, then Linear(5, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.base, self.down, self.up, self.out = nn.Linear(6, 5), nn.Linear(6, 2, bias=False), nn.Linear(2, 5, bias=False), nn.Linear(5, 3)
        self.base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.base(x) + self.up(self.down(x))))


def weight_normed() -> nn.Sequential:
    """Linear(6, 5) with its weight as direction and norm (a parametrization), Tanh, Linear(5, 3)."""
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)), nn.Tanh(), nn.Linear(5, 3))


def sequential_twice() -> nn.Sequential:
    """A Sequential that holds one Linear(6, 6) twice: Linear-Tanh-(the same Linear)-Tanh-Linear(6, 3)."""
    block = nn.Linear(6, 6)
    return nn.Sequential(block, nn.Tanh(), block, nn.Tanh(), nn.Linear(6, 3))


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "linear_twice": (LinearTwice, "mlp"),
    "conv_twice": (ConvTwice, "cnn"),
    "tied_linears": (TiedLinears, "mlp"),
    "shared_linears": (SharedLinears, "mlp"),
    "embedding_twice": (EmbeddingTwice, "mlp"),
    "transposed_twice": (TransposedTwice, "mlp"),
    "skipped_layer": (SkippedLayer, "mlp"),
    "sequential_twice": (sequential_twice, "mlp"),
    "low_rank_adapter": (LowRankAdapter, "mlp"),
    "weight_normed": (weight_normed, "mlp"),
}
NAMES = tuple(name for name in FIRST_ORDER if name != "Time")  # every first-order value with a reference


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().double()


@pytest.mark.parametrize("weight_decay", [0.0, DECAY])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_quantities_add_up_every_run_of_a_parameter(name: str, loss: str, weight_decay: float) -> None:
    seed = 0 if weight_decay else 1
    batches = make_batches(MODELS[name][1], loss, seed, 3)
    model = build(name, seed)
    run = train(model, batches, quantities(NAMES, **histogram_options(model, batches[0], weight_decay)), weight_decay=weight_decay)
    assert not {"NormTest", "GradHist1d", "GradHist2d"} & set(run.instruments.unavailable)
    for step in (0, 1):
        check_first_order(run, step, weight_decay, names=NAMES)


@pytest.mark.parametrize("names", [("GradHist1d",), ("GradHist2d", "NormTest", "OrthoTest")])
@pytest.mark.parametrize("name", ["linear_twice", "conv_twice", "shared_linears"])
def test_runs_add_up_where_the_gradients_are_not_waited_for(name: str, names: tuple[str, ...]) -> None:
    """A histogram alone reads no mean, and accumulated gradients are no batch's mean: the runs'
    parts are then handed over as they come, and must still be added up first."""
    model = build(name, 0)
    batches = make_batches(MODELS[name][1], "ce", 0, 2)
    accumulating = (lambda params: SGDAccumulating(params, lr=0.1)) if len(names) > 1 else (lambda params: torch.optim.SGD(params, lr=0.1))
    run = train(model, batches, quantities(names, **histogram_options(model, batches[0], 0.0)), optimizer=accumulating)
    for step in (0, 1):
        check_first_order(run, step, names=names)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["linear_twice", "conv_twice", "tied_linears", "embedding_twice", "skipped_layer"])
def test_alpha_of_shared_and_skipped_parameters(name: str, optimizer: str) -> None:
    make = (lambda params: torch.optim.SGD(params, lr=0.1)) if optimizer == "sgd" else (lambda params: torch.optim.Adam(params, lr=0.05))
    run = train(build(name, 0), make_batches(MODELS[name][1], "ce", 0, 3), quantities(("Alpha", "Loss")), make, DECAY)
    for step in (0, 1):
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step, DECAY), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", ["linear_twice", "tied_linears", "skipped_layer"])
def test_hess_max_ev_of_shared_and_skipped_parameters(name: str) -> None:
    """A skipped layer's parameters have no gradient at all: the Hessian-vector products must
    still take them (as zero rows), not fail and switch every instrument off."""
    run = train(build(name, 0), make_batches("mlp", "ce", 0, 2), quantities(("HessMaxEV", "GradNorm"), HessMaxEV={"rtol": 1e-7, "atol": 0.0}))
    assert run.instruments.unavailable == {}
    for step in (0, 1):
        assert run.records[step]["HessMaxEV"] == pytest.approx(dense_max_eigenvalue(run, step, 0.0), rel=1e-6)


def test_shared_parameters_are_named() -> None:
    assert shared_parameters(sequential_twice()) == "layer '0' appears 2 times in the model (also as '2')"
    assert shared_parameters(SharedLinears()) == "parameter 'first.weight' is also 'second.weight'"
    assert shared_parameters(TiedLinears()) == "parameter 'encode.weight' is also 'decode.weight'"
    assert shared_parameters(LinearTwice()) is None  # runs twice, but that only the forward pass shows


def test_a_layer_held_twice_gets_no_curvature_but_exact_per_sample_values() -> None:
    model = sequential_twice().double()
    support = check_support(model, nn.CrossEntropyLoss(), "ggn")  # (the Hessian of so small a model comes from products)
    assert support.per_sample == "backpack"  # the output hooks add up the runs
    assert not support.curvature and "BackPACK's curvature rules need every layer once" in support.curvature_reason
    batches = make_batches("mlp", "ce", 0, 2)
    run = train(model, batches, quantities(("HessTrace", "NormTest", "GradHist1d")), curvature="ggn")
    assert set(run.instruments.unavailable) == {"HessTrace"}
    check_first_order(run, 0, names=("NormTest", "GradHist1d"))


class TiedEmbedding(nn.Module):
    """Embedding(12, 6) whose weight is also the output layer's, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.embed((x[:, 0].abs() * 4).long().clamp(max=11)))


def test_an_embedding_tied_to_the_output_layer_is_followed_by_the_hooks() -> None:
    """Both layers' hooks give factors of the same [12, 6] weight (the one-hot ids are the
    embedding's output-side factor): their runs add up, exactly."""
    torch.manual_seed(0)
    model = TiedEmbedding().double()
    assert check_support(model, nn.CrossEntropyLoss()).per_sample == "backpack"
    run = train(model, make_batches("mlp", "ce", 0, 3), quantities(("NormTest", "GradHist1d", "InnerTest")))
    assert run.instruments.capture.factored and run.instruments.changes == [] and run.instruments.unavailable == {}
    for step in (0, 1, 2):
        check_first_order(run, step, names=("NormTest", "GradHist1d", "InnerTest"))


class PaddedTokens(nn.Module):
    """Embedding(12, 4, padding_idx=0) of three tokens per sample, some of them padding, then Linear(12, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(12, 4, padding_idx=0), nn.Linear(12, 3)
        with torch.no_grad():
            self.embed.weight[0] = 0.5  # a padding row of its own, which gets no gradient

    def forward(self, x: Tensor) -> Tensor:
        tokens = (x[:, :3] * 3).long().clamp(min=0, max=11)  # negative inputs become padding
        return self.out(torch.tanh(self.embed(tokens).flatten(1)))


def test_an_embedding_s_padding_row_gets_no_per_sample_gradient() -> None:
    torch.manual_seed(0)
    model = PaddedTokens().double()
    batches = make_batches("mlp", "ce", 0, 3)
    run = train(model, batches, quantities((*NAMES, "Alpha"), **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.capture.factored and run.instruments.unavailable == {}
    for step in (0, 1):
        check_first_order(run, step, names=NAMES)
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)
    # the weight decay moves the padding row: Alpha's second point, alone every other step, takes
    # products with an update whose padding row is not zero
    torch.manual_seed(0)
    run = train(PaddedTokens().double(), batches, quantities(("Alpha", "Loss"), Schedule(every=2)), weight_decay=DECAY)
    assert run.records[0]["Alpha"] == pytest.approx(reference_alpha(run, 0, DECAY), rel=1e-6, abs=1e-8)
    # gradients that hold values before the pass: the mean is formed from the ids and output gradients
    torch.manual_seed(0)
    names = ("NormTest", "InnerTest", "OrthoTest")
    run = train(PaddedTokens().double(), batches, quantities(names), optimizer=lambda params: SGDAccumulating(params, lr=0.1))
    for step in (0, 1):
        check_first_order(run, step, names=names)


def test_shared_weights_outside_linear_and_convolution_layers_use_torch_func() -> None:
    class TiedTransposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.ConvTranspose1d(2, 2, 1, bias=False), nn.Conv1d(2, 2, 1, bias=False)
            self.down.weight = self.up.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.down(self.up(x[:, :4].reshape(-1, 2, 2))).flatten(1)[:, :3]

    support = check_support(TiedTransposed(), nn.CrossEntropyLoss())
    assert support.per_sample == "functorch"
    assert support.per_sample_reason.startswith("parameter 'up.weight' is also 'down.weight', which BackPACK's rules cannot follow")


def test_a_layer_found_running_twice_moves_per_sample_gradients_to_torch_func() -> None:
    """Only the forward pass shows that a transposed convolution runs twice; BackPACK's rule
    would fail on it (it keeps one input per layer). The step's values come from torch.func, and
    so do the later steps', with the change in the run's warnings."""
    model = build("transposed_twice", 0)
    assert check_support(model, nn.CrossEntropyLoss()).per_sample == "backpack"
    run = train(model, make_batches("mlp", "ce", 0, 3), quantities(("NormTest", "GradHist1d")))
    assert run.instruments.support.per_sample == "functorch"
    assert run.instruments.changes == [
        "from step 0: layer 'up' (ConvTranspose1d) runs 2 times in a forward pass, which BackPACK's rules cannot follow; per-sample gradients use torch.func (exact, slower)"
    ]
    for step in (0, 1, 2):
        check_first_order(run, step, names=("NormTest", "GradHist1d"))


def test_a_forward_pass_the_loss_does_not_take_is_no_second_run() -> None:
    """A loop that evaluates with gradients on between steps runs every layer once more: BackPACK
    must not give way to torch.func for that (the loss took one run of the Embedding)."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.out = nn.Embedding(12, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.tanh(self.embed((x[:, 0].abs() * 4).long().clamp(max=11))))

    torch.manual_seed(0)
    model = Tokens().double()
    batches = make_batches("mlp", "ce", 0, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(("NormTest",)))
    for step, batch in enumerate(batches):
        opt.zero_grad()
        model(batch.inputs).sum()  # evaluated with gradients on, never backpropagated
        outputs = model(batch.inputs)
        instruments.backward(step, batch.loss_fn(outputs, batch.targets), batch.inputs, outputs, batch.targets)
        opt.step()
        instruments.after_update(step)
    assert instruments.support.per_sample == "backpack" and instruments.changes == []


class Checkpointed(nn.Module):
    """Linear(6, 5)-Tanh, then a checkpointed block Linear(5, 5)-``norm``-Tanh, then Linear(5, 3)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.first, self.block, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(self.first(x))
        if torch.is_grad_enabled():  # recomputed in the backward pass instead of kept
            hidden = torch.utils.checkpoint.checkpoint(self._block, hidden, use_reentrant=False)
        else:
            hidden = self._block(hidden)
        return self.out(hidden)

    def _block(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.block(hidden)))


def test_activation_checkpointing() -> None:
    """The layers' hooks follow a checkpointed block (its recomputation is no second run), a
    layer norm's too; torch.func, which a PReLU needs, cannot run through it: the per-sample
    quantities go off with the reason, the others go on."""
    batches = make_batches("mlp", "ce", 0, 3)
    for norm in (nn.Identity(), nn.LayerNorm(5)):
        torch.manual_seed(0)
        model = Checkpointed(norm).double()
        if isinstance(norm, nn.LayerNorm):
            with torch.no_grad():  # a bias of its own (one of zeros has no update ratio)
                norm.bias.normal_(0.0, 0.1)
        run = train(model, batches, quantities((*NAMES, "Alpha"), **histogram_options(model, batches[0], 0.0)))
        assert run.instruments.unavailable == {} and run.instruments.changes == []
        for step in (0, 1):
            check_first_order(run, step, names=NAMES)
            assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)

    torch.manual_seed(0)
    run = train(Checkpointed(nn.PReLU(5)).double(), batches, quantities(("NormTest", "Alpha", "GradNorm", "HessMaxEV")))
    assert set(run.instruments.unavailable) == {"NormTest", "Alpha"}
    assert run.instruments.unavailable["NormTest"].endswith("(torch.func, which forms the per-sample gradients of this model, cannot run through activation checkpointing)")
    assert {"GradNorm", "HessMaxEV"} <= set(run.records[1])


def test_a_model_trained_in_eval_mode_is_tracked_through_its_layers_hooks() -> None:
    """Fine-tuning may train with model.eval() (dropout and batch statistics off): the forward
    pass is prepared as any other (it was skipped, and the parameters then read as used outside
    their layers, moving the per-sample gradients to torch.func)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double().eval()
    batches = make_batches("mlp", "ce", 0, 3)
    run = train(model, batches, quantities((*NAMES, "Alpha"), **histogram_options(model, batches[0], 0.0)))
    assert run.instruments.support.per_sample == "backpack" and run.instruments.changes == [] and run.instruments.unavailable == {}
    for step in (0, 1):
        check_first_order(run, step, names=NAMES)
        assert run.records[step]["Alpha"] == pytest.approx(reference_alpha(run, step), rel=1e-6, abs=1e-8)


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")  # the gradients HessMaxEV differentiates
@pytest.mark.parametrize("norm", [False, True])
def test_a_penalty_term_of_the_loss_is_part_of_every_sample_s_gradient(norm: bool) -> None:
    """A loss with a term of its own on a weight (an L1 penalty) uses the weight outside its
    layer: torch.func forms the per-sample data gradients, and the term's gradient, the same for
    every sample, is added to each (the training's gradient minus their mean), read without
    torch's warning where HessMaxEV keeps the gradients differentiable."""
    torch.manual_seed(0)
    model = ref.mlp(0)
    if norm:
        model[1] = nn.LayerNorm(5).double()
    penalty = lambda net: 0.01 * net[0].weight.abs().sum()  # noqa: E731
    batches = make_batches("mlp", "ce", 0, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = ("NormTest", "InnerTest", "OrthoTest", "GradHist1d", "HessMaxEV")
    instruments = Instruments(model, batches[0].loss_fn, batches[0].per_sample_loss_fn, opt, quantities(names, **histogram_options(model, batches[0], 0.0)))
    thetas, found = [], {}
    for step, batch in enumerate(batches):
        thetas.append(snapshot(model))
        opt.zero_grad()
        outputs = model(batch.inputs)
        found.update(engine_step(instruments, opt, step, batch.loss_fn(outputs, batch.targets) + penalty(model), batch.inputs, outputs, batch.targets))
    found.update(instruments.finish())
    assert "used outside its layer '0' (by a term of the loss" in instruments.support.per_sample_reason
    for step, batch in enumerate(batches):
        reference = copy.deepcopy(model)
        load(reference, thetas[step])
        with_penalty = lambda out, y, net=reference: batch.per_sample_loss_fn(out, y) + penalty(net)  # noqa: E731
        grads = ref.per_sample_gradients(reference, with_penalty, batch.inputs, batch.targets)
        for name, expected in (("NormTest", ref.norm_test), ("InnerTest", ref.inner_test), ("OrthoTest", ref.ortho_test)):
            assert found[step][name] == pytest.approx(expected(grads), rel=1e-9)
        check_hist1d(found[step]["GradHist1d"], grads)


def test_a_remainder_within_rounding_is_no_loss_term() -> None:
    """torch.func follows a functional use of a weight itself: the remainder beside the samples'
    mean is then rounding, and adding it would move exactly-zero elements (tokens a sample does
    not use) off the histogram's bin edge at 0. A penalty's gradient is added to every sample."""
    from cockpit_cli.instruments.backend import _add_loss_term

    samples = torch.tensor([[0.0, 2.0, 0.0], [0.0, 4.0, 1.0]])
    mean = samples.mean(0)
    rounded = samples.clone()
    _add_loss_term(rounded, mean * (1 + 1e-7))
    assert torch.equal(rounded, samples)
    penalized = samples.clone()
    _add_loss_term(penalized, mean + torch.tensor([0.01, -0.01, 0.01]))
    assert torch.allclose(penalized, samples + torch.tensor([0.01, -0.01, 0.01]))


def test_the_step_that_moves_to_torch_func_replays_its_dropout_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step at which a layer shows it runs twice forms its per-sample gradients with
    torch.func, which must see the masks the step's forward pass drew: every value equals that of
    a run on torch.func from the start."""

    class TwiceDropout(TransposedTwice):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.drop(torch.tanh(torch.cat([self.up(half.unsqueeze(1)).flatten(1) for half in (x[:, :3], x[:, 3:])], dim=1))))

    def records() -> dict[int, dict]:
        torch.manual_seed(0)
        model = TwiceDropout().double()
        torch.manual_seed(5)
        run = train(model, make_batches("mlp", "ce", 0, 3), quantities(("NormTest", "GradHist1d", "Alpha")))
        assert run.instruments.support.per_sample == "functorch"
        return run.records

    switched = records()
    checked = engine.check_support
    monkeypatch.setattr(engine, "check_support", lambda *args: dataclasses.replace(checked(*args), per_sample="functorch", per_sample_reason="from the start"))
    assert records() == switched
