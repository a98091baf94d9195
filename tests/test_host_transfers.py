"""Values reach Python in few transfers: the quantities share them instead of converting one by one.

On a GPU every conversion of a tensor to a Python number waits for the device; on a small model
on the CPU every tensor operation costs microseconds. These tests count the conversions
(``item``, ``tolist``, ``float``, ``int``) and check the values of the batched forms.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Schedule
from cockpit_cli.instruments.quantities.alpha import means_and_variances
from cockpit_cli.instruments.quantities.base import StepData, counts_as_lists
from cockpit_cli.instruments.accumulator import Accumulator


@contextmanager
def counted_transfers(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter]:
    """Count tensor-to-Python conversions by the file (relative to the repository) that made them."""
    counts: collections.Counter = collections.Counter()
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: object, _original=original, **kwargs: object) -> object:
            caller = Path(sys._getframe(1).f_code.co_filename).as_posix()
            counts[caller[caller.find("cockpit_cli/") :] if "cockpit_cli/" in caller else caller] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        yield counts
    finally:
        monkeypatch.undo()


def test_scalar_totals_reach_python_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    acc = Accumulator(num_params=2)
    acc.add("a", torch.tensor(1.5))
    acc.add("a", torch.tensor(2.0, dtype=torch.float64))
    acc.add("b", torch.tensor(-3.25))
    acc.add("vector", torch.arange(4.0))
    acc.maximum("largest", torch.tensor(7.0))
    with counted_transfers(monkeypatch) as counts:
        values = [acc.scalar("a"), acc.scalar("b"), acc.scalar("largest"), acc.scalar("a")]
    assert values == [3.5, -3.25, 7.0, 3.5]
    assert sum(counts.values()) == 1
    acc.add("b", torch.tensor(1.0))  # each change is seen
    assert acc.scalar("b") == -2.25
    acc.maximum("largest", torch.tensor(9.0))
    assert acc.scalar("largest") == 9.0
    with pytest.raises(KeyError):
        acc.scalar("vector")


def test_totals_of_float32_values_are_float64_sums() -> None:
    """Two parts of 1e-8 added to 1 in float32 vanish; the totals are summed in float64."""
    acc = Accumulator(num_params=3)
    for value in (1.0, 1e-8, 1e-8):
        acc.add("a", torch.tensor(value))
    acc.add("vector", torch.tensor([1.0, 2.0]))  # a single part is converted too
    assert acc.totals["a"].dtype == acc.totals["vector"].dtype == torch.float64
    assert acc.scalar("a") == pytest.approx(1 + 2 * float(torch.tensor(1e-8)), rel=1e-15)


def test_means_and_variances_of_several_vectors_at_once() -> None:
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(9, generator=generator), 1e3 + torch.randn(9, generator=generator, dtype=torch.float64), torch.zeros(9)]
    expected = [(float(v.double().mean()), float(v.double().var())) for v in vectors]
    for (mean, variance), (mean_ref, variance_ref) in zip(means_and_variances(vectors), expected):
        assert mean == pytest.approx(mean_ref, rel=1e-14, abs=1e-14)
        assert variance == pytest.approx(variance_ref, rel=1e-12, abs=1e-14)
    assert means_and_variances([torch.tensor([2.5]), torch.tensor([-1.0])]) == [(2.5, 0.0), (-1.0, 0.0)]  # one sample: no spread


def test_counts_of_every_parameter_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    per_param = [torch.tensor([[1, 2], [3, 4]]), None, torch.tensor([[0, 1], [0, 0]])]
    total = per_param[0] + per_param[2]
    with counted_transfers(monkeypatch) as counts:
        counts_total, counts_by_param = counts_as_lists(total, per_param)
    assert counts_total == [[1, 3], [3, 4]]
    assert counts_by_param == [[[1, 2], [3, 4]], None, [[0, 1], [0, 0]]]
    assert sum(counts.values()) == 1
    assert counts_as_lists(torch.tensor([5]), [None]) == ([5], [None])


@pytest.mark.parametrize(("dtype", "offset", "spread"), [(torch.float32, 0.0, 1e-3), (torch.float32, 1e3, 1e-2), (torch.float64, 1e6, 1e-3)])
def test_input_stats_keep_the_spread_of_inputs_far_from_zero(dtype: torch.dtype, offset: float, spread: float) -> None:
    """Mean and std come from float64 sums; where the mean dwarfs the spread (a ratio of 1e-5 and
    1e-9: the sums' rounding would swamp the variance) the std is taken in two passes."""
    generator = torch.Generator().manual_seed(0)
    inputs = (offset + spread * torch.randn(64, 5, generator=generator, dtype=torch.float64)).to(dtype)
    wide = inputs.double()
    assert float(wide.std()) > spread / 2  # the inputs' dtype keeps the spread: the case is a real one
    data = StepData(step=0, loss=0.0, batch_size=64, params=[], names=[], grads=[], reductions=Accumulator(0), lr=0.1, plain_sgd=True, elapsed=0.0, inputs=inputs)
    QUANTITIES["InputStats"](Schedule()).compute(data)
    stats = data.outputs[0]["InputStats"]
    assert stats["mean"] == pytest.approx(float(wide.mean()), rel=1e-15)
    assert stats["std"] == pytest.approx(float(wide.std(unbiased=False)), rel=1e-8)
    assert (stats["min"], stats["max"]) == (float(inputs.min()), float(inputs.max()))


def test_an_economy_step_converts_few_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of economy at which Alpha both ends and starts, on a two-layer MLP, converts at
    most 19 tensors to Python numbers (32 when every quantity converted its own values).

    Those of the quantities: Alpha 1 (losses and slopes together), GradHist1d 1 (the counts of
    every parameter together), the scalar totals 1 (shared by NormTest, InnerTest, OrthoTest),
    InnerTest and OrthoTest 1 each, InputStats 1, LayerStats 1, the norms of gradients,
    parameters, updates and distances 4. Besides them: the loss 1, the activation statistics 1,
    and the histogram's and centred sum's choices of how to go 6 (the histogram's one per layer:
    how many rows it forms and whether a product could be subnormal, in one transfer).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = [QUANTITIES[name](Schedule()) for name in PRESETS["economy"]]
    instruments = Instruments(model, nn.CrossEntropyLoss(), lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), optimizer, chosen)
    inputs, targets = torch.randn(2, 16, 6), torch.randint(0, 3, (2, 16))

    def step(index: int) -> None:
        optimizer.zero_grad()
        outputs = model(inputs[index])
        instruments.backward(index, nn.functional.cross_entropy(outputs, targets[index]), inputs[index], outputs, targets[index])
        optimizer.step()
        instruments.after_update(index)

    step(0)
    with counted_transfers(monkeypatch) as counts:
        step(1)
    assert not instruments.unavailable
    assert sum(n for caller, n in counts.items() if caller.startswith("cockpit_cli/")) <= 19, counts
    assert instruments.completed(1)[0]["Alpha"] is not None
