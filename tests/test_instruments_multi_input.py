"""Models with several positional inputs (``model(x, z)``), whose engine takes the tuple of inputs,
and models whose outputs are no single tensor (a dict of logits).

The same network is trained twice, once on the tuple (the dict) and once wrapped to take the
inputs joined into one tensor (to return the tensor): a path the brute-force references check.
Every value must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from cockpit_cli.instruments import QUANTITIES, Instruments, Schedule
from cockpit_cli.instruments.engine import NO_MEASURED_INPUTS
from cockpit_cli.instruments.tracker import Tracker
from test_instruments_exact import engine_step, one_thread  # noqa: F401 (fixture)

N, WIDTHS = 8, (4, 3)
NAMES = ("Alpha", "GradNorm", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "GradHist1d", "GradHist2d", "LayerStats", "Activations", "InputStats", "HessMaxEV")


class TwoInputs(nn.Module):
    """``out(act(a(x) + b(z)))`` with an optional LayerNorm (which BackPACK has no rule for)."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(WIDTHS[0], 6), nn.Linear(WIDTHS[1], 6), nn.Linear(6, 3)
        self.norm = nn.LayerNorm(6) if norm else nn.Identity()
        self.act = nn.Tanh()

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.out(self.act(self.norm(self.a(x) + self.b(z))))


class Joined(nn.Module):
    """The same network, taking ``x`` and ``z`` side by side in one tensor."""

    def __init__(self, inner: TwoInputs) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, joined: Tensor) -> Tensor:
        return self.inner(*joined.split(WIDTHS, dim=1))


def records(model: nn.Module, form: str, optimizer: Callable[[Any], torch.optim.Optimizer]) -> dict[int, dict[str, Any]]:
    """Train ``model`` for three steps with the engine, its inputs ``"joined"`` in one tensor, a
    ``"tuple"`` (positional) or a ``"dict"`` (keyword arguments); return its values by step."""
    generator = torch.Generator().manual_seed(0)
    opt = optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    instruments = Instruments(model, loss_fn, nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[name](Schedule(), None) for name in NAMES])
    found: dict[int, dict[str, Any]] = {}
    for step in range(3):
        joined = torch.randn(N, sum(WIDTHS), generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (N,), generator=generator)
        inputs = {"joined": joined, "tuple": tuple(joined.split(WIDTHS, dim=1)), "dict": dict(zip("xz", joined.split(WIDTHS, dim=1)))}[form]
        opt.zero_grad()
        outputs = {"joined": lambda: model(inputs), "tuple": lambda: model(*inputs), "dict": lambda: model(**inputs)}[form]()
        found.update(engine_step(instruments, opt, step, loss_fn(outputs, targets), inputs, outputs, targets))
    found.update(instruments.finish())
    assert instruments.unavailable == {}
    return found


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Drop the wrapper's ``inner.`` from layer names."""
    activations = {name.removeprefix("inner."): stats for name, stats in values.get("Activations", {}).items()}
    return {**values, "Activations": activations} if activations else values


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Numbers to 1e-9 relative, through nested dicts and lists."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), where


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("norm", [False, True])
def test_inputs_in_a_tuple_or_by_keyword_give_the_values_of_the_inputs_joined(norm: bool, optimizer: str, form: str) -> None:
    """Positional inputs (``model(x, z)``) or keyword arguments (``model(x=x, z=z)``, as passed
    in a dict), through BackPACK and (with a LayerNorm) through torch.func."""
    make = (lambda params: torch.optim.SGD(params, lr=0.1)) if optimizer == "sgd" else (lambda params: torch.optim.Adam(params, lr=0.05))
    torch.manual_seed(0)
    network = TwoInputs(norm).double()
    separate = records(network, form, make)
    torch.manual_seed(0)
    joined = records(Joined(TwoInputs(norm).double()), "joined", make)
    assert set(separate) == set(joined) == {0, 1, 2}
    for step in separate:
        assert_same(separate[step], renamed(joined[step]), f"step {step}")


@pytest.mark.parametrize("by_keyword", [False, True], ids=["tuple", "dict"])
def test_token_ids_are_no_input_statistics_and_a_failure_retries_with_the_tuple(by_keyword: bool) -> None:
    """InputStats describes floating-point inputs only; after the instruments fail, the step's
    gradients are taken again by running the model on the tuple (the keyword arguments)."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.out = nn.Embedding(10, 4), nn.Linear(4, 3)

        def forward(self, tokens: Tensor, scale: Tensor) -> Tensor:
            return self.out(self.embed(tokens) * scale)

    torch.manual_seed(0)
    model = Tokens()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    instruments = Instruments(model, loss_fn, nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[name](Schedule(), None) for name in ("InputStats", "NormTest")])
    emitted = []
    tracker = Tracker(instruments, emitted.append)
    from cockpit_cli.training.events import StepRecord

    for step, (tokens, scale) in enumerate([(torch.randint(0, 10, (N,)), torch.ones(N, 1)), (torch.randint(0, 10, (N,)), torch.rand(N, 1))]):
        opt.zero_grad()
        outputs = model(tokens, scale)
        loss = loss_fn(outputs, torch.zeros(N, dtype=torch.long))
        if step == 1:
            instruments.capture.backward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
        inputs = {"scale": scale, "tokens": tokens} if by_keyword else (tokens, scale)
        tracker.backward(step, loss, inputs, outputs, torch.zeros(N, dtype=torch.long))
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        tracker.after_update(step, StepRecord(step=step, epoch=0, loss=float(loss.detach()), lr=[0.1], time=0.0))
    tracker.flush()
    assert emitted[0].quantities["InputStats"] == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}  # the scale only
    assert tracker.failure == "instruments switched off at step 1: RuntimeError: boom"


def test_outputs_in_a_dict_give_the_values_of_the_tensor() -> None:
    """A model may return a dict (or tuple) that its loss functions read: the per-sample losses
    (CABS, Alpha, EarlyStopping) come from it as from the tensor."""

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> dict[str, Any]:
            return {"logits": self.inner(x), "note": "not a tensor"}

    names = ("CABS", "EarlyStopping", "Alpha", "NormTest")
    found = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        model = Logits(inner) if wrapped else inner
        logits = (lambda out: out["logits"]) if wrapped else (lambda out: out)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = lambda out, y: nn.functional.cross_entropy(logits(out), y)  # noqa: E731
        per_sample = lambda out, y: nn.functional.cross_entropy(logits(out), y, reduction="none")  # noqa: E731
        instruments = Instruments(model, loss_fn, per_sample, opt, [QUANTITIES[name](Schedule(), None) for name in names])
        generator = torch.Generator().manual_seed(0)
        values: dict[int, dict[str, Any]] = {}
        for step in range(3):
            inputs, targets = torch.randn(N, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (N,), generator=generator)
            opt.zero_grad()
            outputs = model(inputs)
            values.update(engine_step(instruments, opt, step, loss_fn(outputs, targets), inputs, outputs, targets))
        assert instruments.unavailable == {}
        found.append(values)
    assert set(found[1][0]) == set(names)
    assert_same(found[1], found[0])


def test_a_model_of_token_ids_alone_has_no_input_statistics_with_the_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    instruments = Instruments(model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[name](Schedule(), None) for name in ("InputStats", "NormTest")])
    found: dict[int, dict[str, Any]] = {}
    for step in range(2):
        tokens, targets = torch.randint(0, 10, (N, 3)), torch.randint(0, 3, (N,))
        opt.zero_grad()
        outputs = model(tokens)
        found.update(engine_step(instruments, opt, step, nn.functional.cross_entropy(outputs, targets), tokens, outputs, targets))
    assert instruments.unavailable == {"InputStats": NO_MEASURED_INPUTS}
    assert set(found[0]) == set(found[1]) == {"NormTest"}
