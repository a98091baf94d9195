"""The Python API: instruments in a user's own loop, recorded into a readable run directory."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

from cockpit_cli.api import TrackedRun
from cockpit_cli.display.state import RunInfo
from cockpit_cli.errors import CockpitError
from cockpit_cli.storage.reader import read_run
from cockpit_cli.training.events import RunStatus


def loop(
    run: TrackedRun, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int | Iterable[int], loss_fn: nn.Module | None = None, epoch: int | None = None
) -> None:
    """Train on random batches, numbering the steps ``range(steps)`` or as ``steps`` gives them."""
    generator = torch.Generator().manual_seed(0 if epoch is None else epoch)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    for step in range(steps) if isinstance(steps, int) else steps:
        inputs = torch.randn(16, 5, generator=generator)
        targets = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        run.backward(step, loss, inputs, outputs, targets)
        optimizer.step()
        run.step(step, loss, epoch=epoch)


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
    assert data.manifest["batch_size"] == 16  # learnt at the first step (the start does not know it)
    assert "micro_batch_size" not in data.manifest and RunInfo.from_mapping(data.manifest).batch_text == "16"
    assert [s["step"] for s in data.steps] == [0, 1, 2, 3]
    first = data.steps[0]["quantities"]
    for name in ("Alpha", "NormTest", "HessMaxEV", "GradHist2d", "TICDiag", "LayerStats", "UpdateSize"):
        assert name in first, name
    assert "Alpha" not in data.steps[-1]["quantities"]  # needs the step after the last one
    assert data.manifest["instruments"]["parameters"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert data.evals[0]["splits"]["valid"] == {"loss": 0.5, "accuracy": 0.75, "examples": 0}
    assert data.manifest["warnings"] == []


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.functional.cross_entropy], ids=["another module", "a function"])
def test_a_loss_not_from_the_loss_module_leaves_out_the_curvature_alone(tmp_path: Path, loss_fn: object) -> None:
    """BackPACK's curvature rules start at the call of the loss module given to the instruments:
    a loss computed otherwise switched every instrument off at the first step; now the curvature
    quantities go off with the way out, and the others are tracked."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "other", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="business") as run:
        loop(run, model, optimizer, 3, loss_fn=loss_fn)
    data = read_run(tmp_path / "other")
    assert data.status == "completed" and len(data.steps) == 3
    (warning,) = data.manifest["warnings"]
    assert warning.startswith("TICDiag, HessTrace switched off: failed at step 0")
    unavailable = data.manifest["instruments"]["unavailable"]
    assert set(unavailable) == {"HessTrace", "TICDiag"}
    assert "not computed by the loss module given to the instruments (CrossEntropyLoss)" in unavailable["HessTrace"]
    assert {"NormTest", "Alpha", "GradHist1d"} <= set(data.steps[0]["quantities"])


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


def test_quantities_unavailable_from_the_start_are_no_warnings(tmp_path: Path) -> None:
    """CABS asked for with momentum is unavailable from the start: the manifest says so among
    what is tracked, not as something that went wrong during the run."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrackedRun(tmp_path / "momentum", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, quantities={"CABS": True}) as run:
        loop(run, model, optimizer, 2)
    data = read_run(tmp_path / "momentum")
    assert set(data.manifest["instruments"]["unavailable"]) == {"CABS"}
    assert data.manifest["warnings"] == []


def test_after_the_instruments_fail_the_step_is_plain_training_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instruments fail after the backward pass has filled the gradients: they are switched
    off, the gradients are formed anew (with the weight decay term), and every step, that one
    included, updates the parameters exactly as plain training does."""
    from reference import regularizer, weights

    from cockpit_cli.instruments.backend import GradientCapture

    def failing(self: GradientCapture, loss: torch.Tensor, *args: object, **kwargs: object) -> None:
        loss.backward()
        raise RuntimeError("boom")

    monkeypatch.setattr(GradientCapture, "backward", failing)
    trained = []
    for preset in ("none", "economy"):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(0)
        with TrackedRun(tmp_path / preset, model, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, preset=preset, weight_decay=0.5, decayed_parameters=weights(model)) as run:
            for step in range(2):
                inputs, targets = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
                optimizer.zero_grad()
                outputs = model(inputs)
                loss = loss_fn(outputs, targets) + regularizer(weights(model), 0.5)
                run.backward(step, loss, inputs, outputs, targets)
                optimizer.step()
                run.step(step, loss)
            assert run.tracker.failure == (None if preset == "none" else "instruments switched off at step 0: RuntimeError: boom")
        trained.append(list(model.parameters()))
    for plain, tracked in zip(*trained):
        torch.testing.assert_close(tracked, plain, rtol=1e-6, atol=1e-7)


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


def test_epochs_evaluations_and_the_run_facts_are_recorded_as_given(tmp_path: Path) -> None:
    model = make_model()
    model[0].requires_grad_(False)  # a frozen first layer
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with TrackedRun(tmp_path / "facts", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="none", total_steps=40) as run:
        loop(run, model, optimizer, 1)
        run.step(1, torch.tensor(0.7), epoch=3)
        run.evaluate(2, valid=(torch.tensor(0.5), torch.tensor(0.25)), test=(0.5, None))  # tensors, as a loop computes them
        run.close(RunStatus.DIVERGED, "the loss became nan")  # the block's end closes nothing more
    data = read_run(tmp_path / "facts")
    assert [(s["step"], s["epoch"]) for s in data.steps] == [(0, 0), (1, 3)]
    assert data.evals[0]["splits"] == {"valid": {"loss": 0.5, "accuracy": 0.25, "examples": 0}, "test": {"loss": 0.5, "accuracy": None, "examples": 0}}
    assert (data.manifest["num_parameters"], data.manifest["total_steps"], data.status) == (8 * 3 + 3, 40, "diverged")
    assert data.manifest["message"] == "the loss became nan"


def test_ctrl_c_in_the_loop_marks_the_run_interrupted(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        with TrackedRun(tmp_path / "stopped", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="none") as run:
            loop(run, model, optimizer, 2)
            raise KeyboardInterrupt
    data = read_run(tmp_path / "stopped")
    assert data.status == "interrupted" and len(data.steps) == 2


def test_a_warning_is_in_the_manifest_as_soon_as_it_arises(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "early", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="business") as run:
        loop(run, model, optimizer, 2)  # a loss module the instruments never saw: the curvature quantities go off
        assert read_run(tmp_path / "early").manifest["warnings"][0].startswith("TICDiag, HessTrace switched off: failed at step 0")


def test_the_weight_decay_term_is_part_of_every_per_sample_gradient(tmp_path: Path) -> None:
    """With ``weight_decay`` the instruments see the gradients of ``l_i + R``: the norm test's
    mean gradient includes the term's."""
    from reference import norm_test, per_sample_gradients, regularizer, weights

    inputs, targets = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    model = make_model()
    expected = norm_test(per_sample_gradients(model, nn.CrossEntropyLoss(reduction="none"), inputs, targets, weights(model), 0.5))
    without = norm_test(per_sample_gradients(model, nn.CrossEntropyLoss(reduction="none"), inputs, targets))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with TrackedRun(tmp_path / "decay", model, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, weight_decay=0.5, decayed_parameters=weights(model)) as run:
        outputs = model(inputs)
        loss = loss_fn(outputs, targets) + regularizer(weights(model), 0.5)
        run.backward(0, loss, inputs, outputs, targets)
        optimizer.step()
        run.step(0, loss)
    recorded = read_run(tmp_path / "decay").steps[0]["quantities"]["NormTest"]
    assert recorded == pytest.approx(expected, rel=1e-4) and abs(expected - without) > 1e-2 * expected


def test_log_spaced_tracking_needs_the_number_of_steps(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CockpitError, match="GradNorm spread over the run in log spacing") as raised:
        TrackedRun(tmp_path / "log", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="none", quantities={"GradNorm": {"spacing": "log", "points": 4}})
    assert raised.value.hint == "pass total_steps=N, the number of steps your loop takes" and not (tmp_path / "log").exists()
    with TrackedRun(tmp_path / "log", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="none", quantities={"GradNorm": {"spacing": "log", "points": 4}}, total_steps=100) as run:
        loop(run, model, optimizer, 10)
    assert [s["step"] for s in read_run(tmp_path / "log").steps if "GradNorm" in s["quantities"]] == [0, 4]  # of 0, 4, 21, 99


def test_a_run_directory_that_cannot_be_created_is_explained_in_tracked_run_s_words(tmp_path: Path) -> None:
    """Not in the command line's (--overwrite, --name, --out), which a loop of the API has not."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    arguments = (model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer)
    with TrackedRun(tmp_path / "first", *arguments) as run:
        loop(run, model, optimizer, 1)
    with pytest.raises(CockpitError, match="already exists") as raised:
        TrackedRun(tmp_path / "first", *arguments)
    assert raised.value.hint == "pass overwrite=True to TrackedRun to replace it, or give another run_dir"
    (tmp_path / "file").write_text("")
    with pytest.raises(CockpitError, match="is a file, not a directory") as raised:
        TrackedRun(tmp_path / "file" / "run", *arguments)
    assert raised.value.hint == "give TrackedRun a run_dir in a writable directory"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(CockpitError, match="exists and is not a run directory") as raised:
        TrackedRun(tmp_path / "notes", *arguments, overwrite=True)
    assert raised.value.hint == "give TrackedRun another run_dir" and (tmp_path / "notes" / "mine.txt").exists()
    assert len(read_run(tmp_path / "first").steps) == 1  # nothing lost


def test_the_run_directory_records_the_optimizers_hyperparameters_for_compare_and_diagnose(tmp_path: Path) -> None:
    from cockpit_cli.diagnosis import diagnose

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.03), momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    with TrackedRun(tmp_path / "sgd", model, loss_fn, nn.CrossEntropyLoss(reduction="none"), optimizer, total_steps=2) as run:
        loop(run, model, optimizer, 2, loss_fn)
    data = read_run(tmp_path / "sgd")
    section = data.config["optimizer"]
    assert section["name"] == "SGD" and section["lr"] == pytest.approx(0.03) and section["momentum"] == 0.9 and section["nesterov"] is True
    assert "foreach" not in section and "params" not in section
    skipped = {item.rule: item for item in diagnose(data).not_checked}
    assert skipped["early_stopping"].reason == "needs EarlyStopping, defined for plain SGD only; this run uses SGD with momentum 0.9, nesterov"
    adam = torch.optim.Adam(make_model().parameters(), lr=0.003, betas=(0.8, 0.99))
    with TrackedRun(tmp_path / "adam", make_model(), loss_fn, nn.CrossEntropyLoss(reduction="none"), adam, total_steps=1):
        pass
    assert {key: read_run(tmp_path / "adam").config["optimizer"][key] for key in ("name", "lr", "betas")} == {"name": "Adam", "lr": 0.003, "betas": [0.8, 0.99]}


def test_a_layer_found_running_twice_is_in_the_warnings_once(tmp_path: Path) -> None:
    """Only the forward pass shows that the transposed convolution (a layer with BackPACK's rule
    and no hooks) runs twice: the instruments go on with torch.func, and the run's warnings say
    so, once."""

    class TwoHalves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.out = nn.ConvTranspose1d(1, 2, 2), nn.Linear(12, 3)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([self.up(half.unsqueeze(1)).flatten(1) for half in (inputs[:, :2], inputs[:, 3:5])], dim=1))

    torch.manual_seed(0)
    model = TwoHalves()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "twice", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        loop(run, model, optimizer, 4)
    expected = "from step 0: layer 'up' (ConvTranspose1d) runs 2 times in a forward pass, which BackPACK's rules cannot follow; per-sample gradients use torch.func (exact, slower)"
    recorded = read_run(tmp_path / "twice")
    assert recorded.manifest["warnings"] == [expected]
    assert all("NormTest" in record["quantities"] for record in recorded.steps[:3])


@pytest.mark.parametrize(
    "inputs, described",
    [({"x": torch.zeros(4, 5), "flag": True}, "a dict of 'x': a 2-d tensor, 'flag': bool"), ((), "a tuple of nothing"), ((torch.zeros(4, 5), 3), "a tuple of a 2-d tensor, int"), ("x", "str")],
)
def test_inputs_that_are_no_batch_are_said_so(tmp_path: Path, inputs: object, described: str) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "wrong", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        outputs = model(torch.zeros(4, 5))
        loss = nn.functional.cross_entropy(outputs, torch.zeros(4, dtype=torch.long))
        with pytest.raises(TypeError, match=f"inputs: expected the model's input batch.*; got {described}$"):
            run.backward(0, loss, inputs, outputs, torch.zeros(4, dtype=torch.long))


def test_a_loss_without_gradients_is_said_to_be_the_caller_s_and_leaves_the_instruments_on(tmp_path: Path) -> None:
    """A loss computed under ``torch.no_grad`` cannot be backpropagated: said as the caller's
    mistake, not recorded as the instruments' failure; the loop goes on with the right call."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = torch.zeros(4, dtype=torch.long)
    with TrackedRun(tmp_path / "nograd", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        with torch.no_grad():
            outputs = model(torch.zeros(4, 5))
        with pytest.raises(RuntimeError, match="^loss: a tensor without gradients cannot be backpropagated"):
            run.backward(0, nn.functional.cross_entropy(outputs, targets), torch.zeros(4, 5), outputs, targets)
        with pytest.raises(RuntimeError, match="^loss: a float cannot be backpropagated"):
            run.backward(0, 0.5, torch.zeros(4, 5), outputs, targets)
        loop(run, model, optimizer, 2)
    recorded = read_run(tmp_path / "nograd")
    assert recorded.manifest["warnings"] == [] and "NormTest" in recorded.steps[0]["quantities"]


def test_gradients_accumulated_with_a_scale_train_as_the_scaled_loss_would(tmp_path: Path) -> None:
    """``run.backward(..., scale=1 / k)`` per micro-batch: the parameters move as with
    ``(loss / k).backward()``, and the values describe the first micro-batch's own loss."""
    model, plain = make_model(), make_model()
    optimizer, plain_optimizer = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(6)]
    losses = []
    with TrackedRun(tmp_path / "micro", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, quantities={"Loss": True}) as run:
        for step in range(3):
            optimizer.zero_grad()
            plain_optimizer.zero_grad()
            for inputs, targets in batches[2 * step : 2 * step + 2]:
                outputs = model(inputs)
                loss = nn.functional.cross_entropy(outputs, targets)
                run.backward(step, loss, inputs, outputs, targets, scale=0.5)
                (nn.functional.cross_entropy(plain(inputs), targets) / 2).backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            plain_optimizer.step()
            run.step(step, loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    recorded = read_run(tmp_path / "micro")
    assert [record["quantities"]["Loss"] for record in recorded.steps] == pytest.approx(losses[::2], rel=1e-6)
    # the step's batch is both micro-batches; the values describe the first (the diagnosis and the display read these)
    assert (recorded.manifest["batch_size"], recorded.manifest["micro_batch_size"], recorded.manifest["micro_batches"]) == (16, 8, 2)
    assert RunInfo.from_mapping(recorded.manifest).batch_text == "16 (2 micro-batches)"


def test_a_gradient_scaler_s_run_trains_as_its_own_and_steps_that_overflow_record_no_quantities(tmp_path: Path) -> None:
    """float16 under autocast with ``scale=scaler`` (``torch.amp.GradScaler``) in place of
    ``scaler.scale(loss).backward()``: the parameters move as a twin's with its own scaler, bit
    for bit. The scaler starts too high: its first steps overflow, which it skips while it
    halves the scale; those record their loss and no quantities (an overflow's GradNorm of inf,
    an Alpha of a step not taken), and the steps after it record the usual values."""
    model, twin = make_model(), make_model()
    optimizer, twin_optimizer = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler, twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30), torch.amp.GradScaler("cpu", init_scale=2.0**30)
    generator = torch.Generator().manual_seed(0)
    skipped = []
    with TrackedRun(tmp_path / "amp", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="full", total_steps=30) as run:
        for step in range(30):
            inputs, targets = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
            optimizer.zero_grad()
            twin_optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                outputs = model(inputs)
                loss = nn.functional.cross_entropy(outputs, targets)
                twin_loss = nn.functional.cross_entropy(twin(inputs), targets)
            run.backward(step, loss, inputs, outputs, targets, scale=scaler)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            twin_scaler.scale(twin_loss).backward()
            twin_scaler.step(twin_optimizer)
            twin_scaler.update()
            run.step(step, loss)
            if scaler.get_scale() < scale:
                skipped.append(step)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), step
    assert skipped[0] == 0 and 5 < len(skipped) < 25
    recorded = read_run(tmp_path / "amp")
    assert [warning for warning in recorded.manifest["warnings"] if "overflow" in warning] == [
        "from step 0: steps whose gradients overflow at their loss scale (inf or NaN at scale 1.07374e+09; a gradient scaler "
        "skips their updates and lowers the scale) record no quantities"
    ]
    quantities = {record["step"]: record.get("quantities", {}) for record in recorded.steps}
    assert all(set(quantities[step]) <= {"Loss", "Time"} for step in skipped)
    taken = [step for step in range(29) if step not in skipped]
    assert taken and all(math.isfinite(math.hypot(*quantities[step]["GradNorm"])) and math.isfinite(quantities[step]["NormTest"]) for step in taken)
    assert all(math.isfinite(quantities[step]["Alpha"]) for step in taken if step + 1 not in skipped)
    assert all("Alpha" not in quantities[step] for step in taken if step + 1 in skipped)


def test_a_scale_that_is_no_positive_number_or_scaler_is_the_caller_s_mistake(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)
    with TrackedRun(tmp_path / "scale", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        for scale, error, message in [(0.0, ValueError, "scale: 0.0; give a positive number"), ("2", TypeError, "scale: a str; give a number")]:
            outputs = model(inputs)
            with pytest.raises(error, match=f"^{message}"):
                run.backward(0, nn.functional.cross_entropy(outputs, targets), inputs, outputs, targets, scale=scale)
        loop(run, model, optimizer, 2)
    assert read_run(tmp_path / "scale").manifest["warnings"] == []


def test_the_diagnosis_of_a_run_of_the_api_speaks_of_tracked_run_s_arguments(tmp_path: Path) -> None:
    from cockpit_cli.diagnosis.engine import diagnose

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "short", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, every=4) as run:
        loop(run, model, optimizer, 8)
    advice = {item.rule: item.enable for item in diagnose(read_run(tmp_path / "short")).not_checked}
    assert advice["gradient_noise"] == "train longer, or track NormTest more often (TrackedRun(..., every=k))"
    assert advice["overfitting"] == "run.evaluate(step, valid=(loss, accuracy)) more often"
    assert advice["early_stopping"] == 'TrackedRun(..., quantities={"EarlyStopping": True})'



def test_steps_numbered_from_0_in_every_epoch_are_all_tracked(tmp_path: Path) -> None:
    """A loop of `for step, batch in enumerate(loader)` inside an epoch loop numbers its steps
    0, 1, 2 in every epoch: the run goes on counting where the numbers start again (the second
    epoch's step 0 is the run's step 3, no second backward pass of step 0; Alpha's next point of
    step 2 is step 3), and an evaluation at an epoch's end (its last step + 1) lands after it."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "epochs", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        for epoch in range(2):
            loop(run, model, optimizer, 3, epoch=epoch)
            run.evaluate(3, valid=(1.0, 0.5))  # after the epoch's last step, 2
    recorded = read_run(tmp_path / "epochs")
    assert recorded.manifest["warnings"] == []
    assert [(record["epoch"], record["step"]) for record in recorded.steps] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    assert [record["step"] for record in recorded.evals] == [3, 6]
    assert all({"NormTest", "Alpha"} <= set(record["quantities"]) for record in recorded.steps[:-1])
    assert "Alpha" not in recorded.steps[-1]["quantities"] and "NormTest" in recorded.steps[-1]["quantities"]


def test_a_loop_that_skips_batches_keeps_its_step_numbers(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "gaps", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, every=2) as run:
        loop(run, model, optimizer, (0, 2, 4, 6, 8))
    recorded = read_run(tmp_path / "gaps")
    assert [record["step"] for record in recorded.steps] == [0, 2, 4, 6, 8]
    assert [record["step"] for record in recorded.steps if "NormTest" in record["quantities"]] == [0, 4, 8]  # every second step taken
    assert [record["step"] for record in recorded.steps if "Alpha" in record["quantities"]] == [0, 4]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "resnet18"}, "TrackedRun: model: a str, not a torch.nn.Module"),
        ({"model": nn.ReLU()}, "TrackedRun: model: no parameter requires gradients"),
        ({"optimizer": None}, "TrackedRun: optimizer: a NoneType, not a torch.optim.Optimizer"),
        ({"loss_function": None}, "TrackedRun: loss_function: a NoneType, not a function of (outputs, targets)"),
        ({"per_sample_loss_function": "ce"}, "TrackedRun: per_sample_loss_function: a str, not a function of (outputs, targets)"),
        ({"total_steps": "ten"}, "TrackedRun: total_steps: expected a whole number >= 1, got 'ten'"),
        ({"total_steps": 0}, "TrackedRun: total_steps: expected a whole number >= 1, got 0"),
        ({"weight_decay": -0.1}, "TrackedRun: weight_decay: expected a number >= 0, got -0.1"),
    ],
)
def test_arguments_of_the_wrong_kind_are_said_so_before_anything_is_written(tmp_path: Path, change: dict, message: str) -> None:
    model = make_model()
    arguments = {
        "model": model, "loss_function": nn.CrossEntropyLoss(), "per_sample_loss_function": nn.CrossEntropyLoss(reduction="none"),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), **change,
    }  # fmt: skip
    with pytest.raises(CockpitError) as raised:
        TrackedRun(tmp_path / "run", **arguments)
    assert str(raised.value.message) == message and raised.value.hint and not (tmp_path / "run").exists()


def test_numpy_s_and_torch_s_numbers_are_recorded_as_python_s(tmp_path: Path) -> None:
    """A loop counting with numpy (``np.arange``), losses as numpy or torch scalars."""
    np = pytest.importorskip("numpy")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with TrackedRun(tmp_path / "np", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, total_steps=np.int64(3), weight_decay=np.float32(0.0)) as run:
        for step in np.arange(3):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = nn.functional.cross_entropy(outputs, targets)
            run.backward(step, loss, inputs, outputs, targets)
            optimizer.step()
            run.step(torch.tensor(step), np.float32(loss.item()), epoch=np.int64(0))
        run.evaluate(np.int64(3), valid=(np.float32(0.5), np.float64(0.75)))
        with pytest.raises(TypeError, match=r"^step: a float; give a whole number"):
            run.step(1.5, 0.3)
    recorded = read_run(tmp_path / "np")
    assert recorded.manifest["status"] == "completed" and recorded.manifest["total_steps"] == 3
    assert [s["step"] for s in recorded.steps] == [0, 1, 2] and recorded.evals[0]["splits"]["valid"] == {"loss": 0.5, "accuracy": 0.75, "examples": 0}


def test_a_run_closed_by_its_status_s_name_and_one_left_open_in_the_same_process(tmp_path: Path) -> None:
    """A notebook: a loop that raised outside a with block leaves its run open; creating it again
    says how to close it, and ``close`` takes the status by name."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    arguments = (model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer)
    run = TrackedRun(tmp_path / "cell", *arguments)
    loop(run, model, optimizer, 2)
    with pytest.raises(CockpitError, match="is being written by a run of this process") as raised:
        TrackedRun(tmp_path / "cell", *arguments, overwrite=True)
    assert raised.value.hint == "close the TrackedRun that writes it first: run.close(), or train inside a with block, which closes it"
    with pytest.raises(ValueError, match=r"^status: 'done'; give one of 'completed', 'interrupted', 'failed', 'diverged'$"):
        run.close("done")
    run.close("failed", "the cell raised")
    assert read_run(tmp_path / "cell").manifest["status"] == "failed"
    with TrackedRun(tmp_path / "cell", *arguments, overwrite=True) as again:
        loop(again, model, optimizer, 1)
    assert read_run(tmp_path / "cell").manifest["status"] == "completed"


def test_slips_of_the_loop_are_said_once_and_recorded(tmp_path: Path) -> None:
    """run.step twice for a step (the second is ignored), run.step after loss.backward() (no
    quantities), and run.backward whose steps run.step never records (an empty run)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(8, 5), torch.randint(0, 3, (8,))
    arguments = (model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer)

    def train_step(run: TrackedRun, step: int, tracked: bool = True, record: bool = True) -> torch.Tensor:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = nn.functional.cross_entropy(outputs, targets)
        run.backward(step, loss, inputs, outputs, targets) if tracked else loss.backward()
        optimizer.step()
        if record:
            run.step(step, loss)
        return loss

    with pytest.warns(UserWarning) as caught, TrackedRun(tmp_path / "slips", *arguments) as run:
        for step in range(3):
            run.step(step, train_step(run, step))  # a second time
        train_step(run, 3, tracked=False)
        train_step(run, 4, tracked=False)
    said = [
        "run.step was called again for step 0; the second call is ignored (call it once per step, after optimizer.step())",
        "run.step recorded step 3 without run.backward for it, so no quantity was computed there; "
        "call run.backward(step, loss, inputs, outputs, targets) in place of loss.backward()",
    ]
    assert [str(w.message) for w in caught] == said
    recorded = read_run(tmp_path / "slips")
    assert [s["step"] for s in recorded.steps] == [0, 1, 2, 3, 4] and recorded.manifest["warnings"] == said
    assert "NormTest" in recorded.steps[2]["quantities"] and "NormTest" not in recorded.steps[3]["quantities"]
    with pytest.warns(UserWarning, match=r"^run.backward saw step 1, but run.step did not record it \(nor any step\); call run.step\(step, loss\)"):
        with TrackedRun(tmp_path / "unrecorded", *arguments) as run:
            for step in range(2):
                train_step(run, step, record=False)
    assert read_run(tmp_path / "unrecorded").steps == [] and len(read_run(tmp_path / "unrecorded").manifest["warnings"]) == 1


def test_evaluations_take_a_loss_alone_and_refuse_percentages(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrackedRun(tmp_path / "evals", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer) as run:
        loop(run, model, optimizer, 1)
        run.evaluate(1, valid=(torch.tensor(0.5), 0.75), test=torch.tensor(0.25))
        for value, message in [((0.5, 95.0), "valid: accuracy 95 is no fraction in [0, 1]; give 0.95 for 95%"), ((0.5, "x"), "valid: (0.5, 'x'); give (loss, accuracy)")]:
            with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
                run.evaluate(1, valid=value)
    assert read_run(tmp_path / "evals").evals == [
        {"step": 1, "epoch": 0, "time": pytest.approx(read_run(tmp_path / "evals").evals[0]["time"]), "splits": {"valid": {"loss": 0.5, "accuracy": 0.75, "examples": 0}, "test": {"loss": 0.25, "accuracy": None, "examples": 0}}, "samples": None}
    ]


def test_a_run_the_script_never_closes_is_closed_at_its_exit_with_every_record(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "unclosed.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn
        from cockpit_cli.api import TrackedRun
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        inputs, targets = torch.randn(16, 5), torch.randint(0, 3, (16,))
        run = TrackedRun({str(tmp_path / "run")!r}, model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer)
        for step in range(4):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = nn.functional.cross_entropy(outputs, targets)
            run.backward(step, loss, inputs, outputs, targets)
            optimizer.step()
            run.step(step, loss)
    """))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
    recorded = read_run(tmp_path / "run")
    assert recorded.manifest["status"] == "interrupted" and recorded.manifest["message"].startswith("the process ended before the run was closed; close it with run.close()")
    assert [s["step"] for s in recorded.steps] == [0, 1, 2, 3] and "NormTest" in recorded.steps[3]["quantities"]  # the last step's record waited for none
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_script_that_makes_warnings_errors_gets_every_quantity(tmp_path: Path) -> None:
    """torch's notices about the instruments' own work (BackPACK's hook on the first layer,
    forward-mode derivatives scripting helpers at their first use, the graph kept for
    Hessian-vector products) raised as errors in a script that turns warnings into errors after
    importing cockpit, and switched every quantity off; a script that shows warnings printed
    them at every tracked step."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "strict.py"
    script.write_text(textwrap.dedent(f"""
        import json, warnings
        import torch
        from torch import nn
        from cockpit_cli.api import TrackedRun
        warnings.simplefilter("error")
        torch.manual_seed(0)
        for name, model, curvature in [
            ("cnn", nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), "hessian"),
            ("prelu", nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.PReLU(), nn.Linear(8, 3)), "hessian"),  # torch.func, forward mode
        ]:
            optimizer, loss_function = torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()
            inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
            directory = {str(tmp_path)!r} + "/" + name
            # every 2 steps: at steps 1 and 3, Alpha's second point alone (of the PReLU model: a forward-mode pass)
            with TrackedRun(directory, model, loss_function, nn.CrossEntropyLoss(reduction="none"), optimizer, preset="full", every=2, curvature=curvature) as run:
                for step in range(4):
                    optimizer.zero_grad()
                    outputs = model(inputs)
                    loss = loss_function(outputs, targets)
                    run.backward(step, loss, inputs, outputs, targets)
                    optimizer.step()
                    run.step(step, loss)
    """))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=120)
    for name in ("cnn", "prelu"):
        recorded = read_run(tmp_path / name)
        assert recorded.manifest["status"] == "completed"
        unavailable = recorded.manifest["instruments"]["unavailable"]
        assert not [reason for reason in unavailable.values() if "Warning" in reason], unavailable
        assert recorded.manifest["warnings"] == []
        assert all({"Alpha", "NormTest", "HessMaxEV"} <= set(recorded.steps[step]["quantities"]) for step in (0, 2))
    assert "HessTrace" in read_run(tmp_path / "cnn").steps[0]["quantities"]


def test_a_run_names_its_embedding_tables_and_their_zero_rows_are_no_dead_units(tmp_path: Path) -> None:
    """20 token ids out of 1,000 per sample: most rows of the table get no gradient. Token ids leave
    InputStats without measurements, which was a warning of every such run."""
    from cockpit_cli.diagnosis.engine import diagnose

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 4), nn.Flatten(), nn.Linear(80, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    with TrackedRun(tmp_path / "tokens", model, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), optimizer, preset="economy") as run:
        for step in range(40):
            ids, targets = torch.randint(0, 1000, (8, 20), generator=generator), torch.randint(0, 3, (8,), generator=generator)
            optimizer.zero_grad()
            outputs = model(ids)
            loss = nn.CrossEntropyLoss()(outputs, targets)
            run.backward(step, loss, ids, outputs, targets)
            optimizer.step()
            run.step(step, loss)
    recorded = read_run(tmp_path / "tokens")
    assert recorded.manifest["instruments"]["lookup_tables"] == ["0.weight"]
    assert recorded.manifest["warnings"] == []  # InputStats of token ids is no failure; the manifest lists it unavailable
    assert "InputStats" in recorded.manifest["instruments"]["unavailable"]
    assert recorded.steps[0]["quantities"]["LayerStats"]["zero_grad_fraction"][0] > 0.7
    assert "dead_units" not in [finding.rule for finding in diagnose(recorded).findings]
