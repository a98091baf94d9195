"""The curvature factor's memory: the estimate, its bound on what is used, and switching off."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cockpit_cli.instruments.allocations import peak_cpu_bytes as peak_bytes
from cockpit_cli.instruments import QUANTITIES, Instruments, Schedule, curvature_memory
from cockpit_cli.instruments.tracker import Tracker
from cockpit_cli.training.events import StepRecord


def test_factor_columns_per_curvature_and_loss() -> None:
    outputs = torch.zeros(4, 10)
    assert curvature_memory.factor_columns("hessian", nn.CrossEntropyLoss(), outputs) == 9
    assert curvature_memory.factor_columns("ggn", nn.CrossEntropyLoss(), torch.zeros(4, 2)) == 1
    assert curvature_memory.factor_columns("ggn", nn.MSELoss(), torch.zeros(4, 3, 2)) == 6
    assert curvature_memory.factor_columns("hessian", nn.CrossEntropyLoss(), torch.zeros(4, 10, 7)) == 70  # classes over a sequence: BackPACK's factor
    assert curvature_memory.factor_columns("ggn", nn.BCEWithLogitsLoss(), torch.zeros(4, 5)) == 5
    assert curvature_memory.factor_columns("ggn_mc", nn.CrossEntropyLoss(), outputs) == 1


def test_shortfall_names_the_size_and_the_way_out() -> None:
    fits = curvature_memory.shortfall(99, 256, 98_304, 4, 64 * curvature_memory.GIB, "hessian")
    assert fits is None
    reason = curvature_memory.shortfall(99, 256, 98_304, 4, 8 * curvature_memory.GIB, "hessian")
    assert reason is not None
    assert "about 27.8 GiB" in reason and "99 column(s)" in reason and "8.0 GiB" in reason and "ggn_mc" in reason
    monte_carlo = curvature_memory.shortfall(1, 256, 98_304, 4, 1, "ggn_mc")
    assert monte_carlo is not None and "ggn_mc (one" not in monte_carlo
    assert curvature_memory.shortfall(99, 256, 98_304, 4, None, "hessian") is None  # unknown: go ahead


def test_the_memory_available_is_known_on_this_cpu() -> None:
    available = curvature_memory.available_bytes(torch.device("cpu"))
    assert available is None or available > 0


def cnn_run(quantity_names: tuple[str, ...], steps: int = 2) -> tuple[Tracker, list[StepRecord], nn.Module]:
    """Train a small CNN with cross-entropy for ``steps`` steps, the quantities due at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_function = nn.CrossEntropyLoss()
    chosen = [QUANTITIES[name](Schedule()) for name in quantity_names]
    instruments = Instruments(model, loss_function, nn.CrossEntropyLoss(reduction="none"), optimizer, chosen)
    records: list[StepRecord] = []
    tracker = Tracker(instruments, records.append)
    for step in range(steps):
        inputs, targets = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_function(outputs, targets)
        tracker.backward(step, loss, inputs, outputs, targets)
        optimizer.step()
        tracker.after_update(step, StepRecord(step=step, epoch=0, loss=loss.item(), lr=[0.01], time=0.0))
    tracker.flush()
    return tracker, records, model


def test_curvature_quantities_are_switched_off_with_the_reason_where_the_factor_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curvature_memory, "available_bytes", lambda device: 1024)
    tracker, records, _ = cnn_run(("HessTrace", "TICDiag", "GradNorm"))
    assert all("GradNorm" in record.quantities for record in records)
    assert not any({"HessTrace", "TICDiag"} & set(record.quantities) for record in records)
    reason = tracker.describe()["unavailable"]["HessTrace"]
    assert reason.startswith("the curvature diagonal (hessian) would need about") and "9 column(s) per sample, 32 samples, up to 3,136 numbers" in reason
    assert tracker.warnings() == [f"HessTrace, TICDiag switched off: {reason}"]  # one line for one reason


def test_curvature_quantities_stay_where_the_factor_fits() -> None:
    tracker, records, _ = cnn_run(("HessTrace", "GradNorm"))
    assert all({"HessTrace", "GradNorm"} <= set(record.quantities) for record in records)
    assert tracker.warnings() == []
    assert not tracker.instruments.model._forward_hooks and all(not m._forward_hooks for m in tracker.instruments.model.modules())


def test_the_estimate_bounds_the_memory_the_curvature_takes() -> None:
    """The instruments' memory above plain training with HessTrace due (one step) stays below
    FACTOR_COPIES times the largest factor: the estimate errs on the safe side."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
    inputs, targets = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    factor = 9 * 64 * (16 * 30 * 30) * 4
    extra = peak_bytes(lambda: one_step(copy.deepcopy(template), inputs, targets, "hessian")) - peak_bytes(lambda: one_step(copy.deepcopy(template), inputs, targets, None))
    assert factor < extra < curvature_memory.FACTOR_COPIES * factor, extra / factor


def test_sizes_below_a_gib_are_given_in_mib() -> None:
    reason = curvature_memory.shortfall(9, 100, 640, 4, 1 << 20, "hessian")
    assert reason is not None and "about 7 MiB" in reason and "only 1 MiB are available" in reason
    reason = curvature_memory.shortfall(1, 1, curvature_memory.GIB // 2, 1, curvature_memory.GIB, "hessian")  # 1.5 GiB needed
    assert reason is not None and "about 1.5 GiB" in reason and "only 1.0 GiB are available" in reason


def test_finish_removes_the_size_hooks_of_a_step_that_was_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    instruments = Instruments(model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, [QUANTITIES["HessTrace"](Schedule())])
    model(torch.randn(2, 3, 8, 8))  # step 0's forward pass measures the layer outputs
    assert any(module._forward_hooks for module in model.modules())
    instruments.skip(0)  # a non-finite loss: no backward pass, no check
    instruments.finish()
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def smooth_cnn() -> nn.Sequential:
    """Conv2d(3, 8, 3), Tanh (a second derivative: the Hessian's residual, 8 * 14 * 14 columns), Linear(., 10)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))


def one_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, curvature: str | None) -> Instruments | None:
    """One step of ``model`` with cross-entropy and HessTrace due, of the diagonal ``curvature``
    (plain training for ``None``); return the instruments."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_function = nn.CrossEntropyLoss()
    instruments = None
    if curvature is not None:
        instruments = Instruments(model, loss_function, nn.CrossEntropyLoss(reduction="none"), optimizer, [QUANTITIES["HessTrace"](Schedule())], curvature=curvature)
    outputs = model(inputs)
    loss = loss_function(outputs, targets)
    if instruments is None:
        loss.backward()
    else:
        instruments.backward(0, loss, inputs, outputs, targets)
    optimizer.step()
    return instruments


def smooth_step(model: nn.Module, curvature: str | None) -> Instruments | None:
    """:func:`one_step` on 32 samples ``[3, 16, 16]``."""
    generator = torch.Generator().manual_seed(1)
    return one_step(model, torch.randn(32, 3, 16, 16, generator=generator), torch.randint(0, 10, (32,), generator=generator), curvature)


def test_the_estimate_bounds_the_memory_of_the_hessian_s_residuals() -> None:
    """A layer with a second derivative adds a column per element of its output to the Hessian's
    factor: here 1,568 beside the loss's 9 (the estimate without them was 175 times too small)."""
    template = smooth_cnn()
    factor = (9 + 8 * 14 * 14) * 32 * (8 * 14 * 14) * 4
    extra = peak_bytes(lambda: smooth_step(copy.deepcopy(template), "hessian")) - peak_bytes(lambda: smooth_step(copy.deepcopy(template), None))
    assert factor < extra < curvature_memory.FACTOR_COPIES * factor, extra / factor


def test_the_hessian_s_residuals_count_where_it_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory for the loss's columns but not for the residuals: the Hessian is switched off, saying
    so and that the GGN has none; the GGN's diagonal is computed."""
    loss_columns_only = curvature_memory.FACTOR_COPIES * 9 * 32 * (8 * 14 * 14) * 4
    monkeypatch.setattr(curvature_memory, "available_bytes", lambda device: int(2 * loss_columns_only))
    hessian = smooth_step(smooth_cnn(), "hessian")
    reason = hessian.unavailable["HessTrace"]
    assert "a factor of 1577 column(s), 1568 of them the residuals of layers with a second derivative, per sample" in reason
    assert "use the ggn curvature (the Hessian without the layers' second derivatives" in reason
    ggn = smooth_step(smooth_cnn(), "ggn")
    assert ggn.unavailable == {} and "HessTrace" in ggn.completed(0)[0]


def test_layers_with_a_second_derivative_add_residuals_to_the_hessian_alone() -> None:
    """Piecewise linear activations add none (their residual, zero, cost a column per element of
    their output: 94 s against 0.04 s a step for a small CNN with ReLU6 and Hardtanh)."""
    from cockpit_cli.instruments.curvature_diagonal import adds_residual, curvature_extension

    hessian, ggn = curvature_extension("hessian"), curvature_extension("ggn")
    curved = [nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.SiLU(), nn.Softplus(), nn.Hardswish()]
    straight = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(), nn.Hardsigmoid(), nn.LeakyReLU(), nn.Identity(), nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten()]
    assert [adds_residual(hessian, layer) for layer in curved] == [True] * len(curved)
    assert [adds_residual(hessian, layer) for layer in straight] == [False] * len(straight)
    assert not any(adds_residual(ggn, layer) for layer in curved)  # the GGN's rules have no residuals
