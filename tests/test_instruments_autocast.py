"""Training under ``torch.autocast`` (mixed precision): the layers run in half precision while
the parameters and their gradients stay in float32.

The per-sample gradients are formed from the layers' half-precision factors in the parameters'
precision, so their statistics at the first step agree with those of a float32 run from the
same start to the half precision's rounding. BackPACK's curvature rules cannot backpropagate
mixed precisions: HessTrace and TICDiag are left out with the reason, the rest goes on.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Schedule
from cockpit_cli.instruments.engine import AUTOCAST_REASON
from test_instruments_exact import engine_step, one_thread  # noqa: F401 (fixture)

N = 16


class TokensConv(nn.Module):
    """Embedding-Conv1d-Linear on token ids: per-sample gradients through BackPACK's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.conv, self.out = nn.Embedding(10, 6), nn.Conv1d(6, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.relu(self.conv(self.embed(tokens).transpose(1, 2))).mean(2))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), lambda g: torch.randn(N, 5, generator=g)),
    "tokens": (TokensConv, lambda g: torch.randint(0, 10, (N, 7), generator=g)),
}
# Beside those, for the scaled losses: a wider MLP, whose Hessian-vector products of the scaled
# gradients overflow float16 at scales its gradients stand (see hessian_vector_product), and
# one with tanh, whose exact Hessian diagonal has the terms that read the output gradients.
SCALED_MODELS = {
    **MODELS,
    "wide": (lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)), lambda g: torch.randn(N, 20, generator=g)),
    "tanh": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), lambda g: torch.randn(N, 5, generator=g)),
}
COMPARED = ("NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "HessMaxEV")


def autocast_run(name: str, autocast: bool, tracked: list[str], schedule: Schedule, steps: int) -> tuple[dict[int, dict[str, Any]], Instruments]:
    """Train model ``name`` for ``steps`` steps with ``tracked`` quantities, under autocast or not."""
    torch.manual_seed(0)
    build, draw = MODELS[name]
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    instruments = Instruments(model, loss_fn, nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[n](schedule, None) for n in tracked])
    generator = torch.Generator().manual_seed(1)
    found: dict[int, dict[str, Any]] = {}
    for step in range(steps):
        inputs, targets = draw(generator), torch.randint(0, 3, (N,), generator=generator)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        found.update(engine_step(instruments, opt, step, loss, inputs, outputs, targets))
    found.update(instruments.finish())
    return found, instruments


def first_step(name: str, autocast: bool) -> tuple[dict[str, Any], Instruments]:
    found, instruments = autocast_run(name, autocast, sorted({*PRESETS["full"], "MeanGSNR"}), Schedule(), 3)
    return found[0], instruments


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_statistics_under_autocast_agree_with_float32(name: str) -> None:
    mixed, instruments = first_step(name, autocast=True)
    exact, plain = first_step(name, autocast=False)
    curvature = {"TICDiag", "HessTrace"} if plain.support.curvature else set()
    assert instruments.unavailable == {**{q: AUTOCAST_REASON for q in curvature}, **plain.unavailable}
    assert set(mixed) == set(exact) - curvature
    for quantity in COMPARED:
        assert mixed[quantity] == pytest.approx(exact[quantity], rel=0.03), quantity
    assert sum(mixed["GradHist1d"]["counts"]) == sum(exact["GradHist1d"]["counts"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_alpha_s_second_point_alone_under_autocast(name: str) -> None:
    """The step after a tracked one takes only each layer's products with the update (from the
    half-precision factors of the pass) and ends Alpha in float32."""
    found, instruments = autocast_run(name, True, ["Alpha"], Schedule(every=2), 4)
    assert instruments.unavailable == {}
    assert all(math.isfinite(found[step]["Alpha"]) for step in (0, 2))


def scaled_run(name: str, dtype: torch.dtype | None, weight: float, scale: float, names: list[str], every: int = 1, steps: int = 4) -> tuple[dict[int, dict[str, Any]], Instruments]:
    """Train model ``name`` on ``weight`` times the cross-entropy, backpropagated times ``scale``
    (``dtype``: autocast's, or ``None`` for float32) and unscaled before the update, beside a
    twin trained by ``(scale * loss).backward()``: the gradients must equal the twin's, bit for bit."""
    torch.manual_seed(0)
    build, draw = SCALED_MODELS[name]
    model = build()
    twin = copy.deepcopy(model)
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    instruments = Instruments(model, loss_fn, nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[n](Schedule(every=every), None) for n in names])
    generator = torch.Generator().manual_seed(1)
    found: dict[int, dict[str, Any]] = {}
    for step in range(steps):
        inputs, targets = draw(generator), torch.randint(0, 3, (N,), generator=generator)
        opt.zero_grad()
        twin_opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            outputs = model(inputs)
            loss = weight * loss_fn(outputs, targets)
            twin_loss = weight * nn.functional.cross_entropy(twin(inputs), targets)
        instruments.backward(step, loss, inputs, outputs, targets, scale=scale)
        (scale * twin_loss).backward()
        for param, twin_param in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(param.grad, twin_param.grad, rtol=0, atol=0, equal_nan=True)  # (overflows alike)
        with torch.no_grad():  # as a gradient scaler unscales them before the update
            for param in (*model.parameters(), *twin.parameters()):
                param.grad /= scale
        opt.step()
        twin_opt.step()
        instruments.after_update(step)
        found.update(instruments.completed(step))
    found.update(instruments.finish())
    return found, instruments


@pytest.mark.parametrize(("name", "weight", "scale"), [("mlp", 1e-4, 2.0**12), ("tokens", 1e-4, 2.0**12), ("wide", 1.0, 2.0**17)])
def test_a_loss_scaled_for_float16_trains_as_its_scaled_pass_and_its_values_are_the_loss_s(name: str, weight: float, scale: float) -> None:
    """float16 under autocast, with a gradient scaler's factor: the tracked steps backpropagate
    the scaled loss as training does (the unscaled loss's output gradients of a loss weighted
    1e-4 underflow float16), and the values describe the loss. The wide model's Hessian-vector
    products of the gradients scaled by 2^17 overflow float16 if taken along v itself."""
    names = sorted({*PRESETS["full"], "MeanGSNR"})
    mixed, instruments = scaled_run(name, torch.float16, weight, scale, names)
    exact, plain = scaled_run(name, None, weight, 1.0, names)
    assert set(instruments.unavailable) == {"TICDiag", "HessTrace"} | set(plain.unavailable)
    # (the loss weighted 1e-4 changes by less than float16's logits resolve: no alpha to compare)
    for quantity in (*COMPARED, "Alpha") if weight == 1.0 else COMPARED:
        assert mixed[0][quantity] == pytest.approx(exact[0][quantity], rel=0.03), quantity
    grad_norm = math.hypot(*mixed[0]["GradNorm"])
    assert grad_norm == pytest.approx(math.hypot(*exact[0]["GradNorm"]), rel=0.03)
    assert sum(mixed[0]["GradHist1d"]["counts"]) == sum(exact[0]["GradHist1d"]["counts"])


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("name", ["mlp", "tanh", "tokens"])
def test_a_scaled_loss_in_float32_gives_the_loss_s_values_with_curvature_too(name: str, every: int) -> None:
    """In float32, a power-of-two scale changes no rounding: every value equals the unscaled
    run's, also where curvature is due (that pass backpropagates the loss and scales the
    gradients after: tanh's Hessian diagonal reads the output gradients), for the
    Hessian-vector products of the scaled gradients, and at Alpha's second point alone."""
    names = sorted({*PRESETS["full"], "MeanGSNR"})
    scaled, instruments = scaled_run(name, None, 1.0, 2.0**10, names, every)
    plain, reference = scaled_run(name, None, 1.0, 1.0, names, every)
    assert instruments.unavailable == reference.unavailable
    assert set(scaled) == set(plain) and all(set(scaled[step]) == set(plain[step]) for step in plain)
    for step in plain:
        for quantity, value in plain[step].items():
            if quantity != "Time":
                assert json.dumps(scaled[step][quantity]) == json.dumps(value), (step, quantity)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_norms_of_a_model_in_half_precision_keep_float32_s_digits(dtype: torch.dtype) -> None:
    """A model whose parameters are themselves half precision (no autocast): the norms of its
    gradients and parameters are those of its half-precision tensors, summed and given in float32
    (in their own precision they kept three digits)."""
    torch.manual_seed(0)
    model = MODELS["mlp"][0]().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    instruments = Instruments(model, loss_fn, nn.CrossEntropyLoss(reduction="none"), opt, [QUANTITIES[name](Schedule(), None) for name in ("GradNorm", "LayerStats")])
    inputs, targets = torch.randn(N, 5).to(dtype), torch.randint(0, 3, (N,))
    outputs = model(inputs)
    instruments.backward(0, loss_fn(outputs, targets), inputs, outputs, targets)
    gradients = [float(p.grad.double().norm()) for p in model.parameters()]
    weights = [float(p.detach().double().norm()) for p in model.parameters()]
    opt.step()
    instruments.after_update(0)
    record = instruments.completed(0)[0]
    assert record["GradNorm"] == pytest.approx(gradients, rel=1e-6)
    assert record["LayerStats"]["grad_norm"] == pytest.approx(gradients, rel=1e-6)
    assert record["LayerStats"]["weight_norm"] == pytest.approx(weights, rel=1e-6)
