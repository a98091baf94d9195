"""Training under ``torch.autocast`` (mixed precision): the layers run in half precision while
the parameters and their gradients stay in float32.

The per-sample gradients are formed from the layers' half-precision factors in the parameters'
precision, so their statistics at the first step agree with those of a float32 run from the
same start to the half precision's rounding. BackPACK's curvature rules cannot backpropagate
mixed precisions: HessTrace and TICDiag are left out with the reason, the rest goes on.
"""

from __future__ import annotations

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
