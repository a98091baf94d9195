"""The Python API: instruments in a user's own loop, recorded into a readable run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cockpit_cli.api import TrackedRun
from cockpit_cli.storage.reader import read_run


def loop(run: TrackedRun, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, loss_fn: nn.Module | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    for step in range(steps):
        inputs = torch.randn(16, 5, generator=generator)
        targets = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        run.backward(step, loss, inputs, outputs, targets)
        optimizer.step()
        run.step(step, loss)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_user_loop_gets_a_run_directory_with_every_quantity(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with TrackedRun(tmp_path / "mine", model, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, preset="full", total_steps=4) as run:
        loop(run, model, optimizer, 4, loss_fn)
        run.evaluate(4, valid=(0.5, 0.75))
    data = read_run(tmp_path / "mine")
    assert data.status == "completed"
    assert [s["step"] for s in data.steps] == [0, 1, 2, 3]
    first = data.steps[0]["quantities"]
    for name in ("Alpha", "NormTest", "HessMaxEV", "GradHist2d", "TICDiag", "LayerStats", "UpdateSize"):
        assert name in first, name
    assert "Alpha" not in data.steps[-1]["quantities"]  # needs the step after the last one
    assert data.manifest["instruments"]["parameters"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert data.evals[0]["splits"]["valid"] == {"loss": 0.5, "accuracy": 0.75, "examples": 0}
    assert data.manifest["warnings"] == []


def test_a_loss_from_another_module_switches_curvature_off_cleanly(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "other", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="business") as run:
        loop(run, model, optimizer, 3)  # computes its loss with a module the instruments never saw
    data = read_run(tmp_path / "other")
    assert data.status == "completed" and len(data.steps) == 3
    (warning,) = data.manifest["warnings"]
    assert warning.startswith("instruments switched off at step 0") and "loss module given to the instruments" in warning


def test_api_does_not_change_training(tmp_path: Path) -> None:
    plain = make_model()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    with TrackedRun(tmp_path / "plain", plain, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="none") as run:
        loop(run, plain, optimizer, 5)
    tracked = make_model()
    optimizer = torch.optim.SGD(tracked.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with TrackedRun(tmp_path / "tracked", tracked, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, preset="full") as run:
        loop(run, tracked, optimizer, 5, loss_fn)
        assert run.tracker.failure is None
    for a, b in zip(plain.parameters(), tracked.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_exception_in_the_loop_marks_the_run_failed(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError):
        with TrackedRun(tmp_path / "boom", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
            loop(run, model, optimizer, 2)
            raise RuntimeError("data loader broke")
    data = read_run(tmp_path / "boom")
    assert data.status == "failed" and data.manifest["message"] == "RuntimeError: data loader broke"
    assert len(data.steps) == 2
