"""The training loop: records, evaluation schedule, schedules, divergence, interruption."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from cockpit_cli.config import parse_config
from cockpit_cli.training.build import build_run
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, RunStatus, StepRecord
from cockpit_cli.training.loop import train
from conftest import tiny_config


class Recorder:
    """Observer that keeps everything it is told."""

    def __init__(self, interrupt_at: int | None = None):
        self.meta: RunMeta | None = None
        self.steps: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.end: RunEnd | None = None
        self.interrupt_at = interrupt_at

    def on_start(self, meta: RunMeta) -> None:
        self.meta = meta

    def on_step(self, record: StepRecord) -> None:
        self.steps.append(record)
        if self.interrupt_at is not None and record.step == self.interrupt_at:
            raise KeyboardInterrupt

    def on_eval(self, record: EvalRecord) -> None:
        self.evals.append(record)

    def on_end(self, end: RunEnd) -> None:
        self.end = end


def run(data_dir: Path, tmp_path: Path, recorder: Recorder | None = None, **sections) -> Recorder:
    recorder = recorder or Recorder()
    setup = build_run(parse_config(tiny_config(data_dir, tmp_path, **sections)))
    train(setup, [recorder])
    return recorder


def test_records_every_step_and_evaluates_on_schedule(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path)
    assert recorder.end is not None and recorder.end.status is RunStatus.COMPLETED
    assert [r.step for r in recorder.steps] == list(range(12))
    assert [r.step for r in recorder.evals] == [0, 5, 10, 12]  # start, every 5 steps, end
    assert recorder.meta is not None and recorder.meta.total_steps == 12
    for record in recorder.evals:
        assert set(record.splits) == {"train_eval", "valid", "test"}
        assert record.splits["valid"].examples == 64  # eval_max_batches=2 at batch 32
        assert 0.0 <= record.splits["valid"].accuracy <= 1.0
    assert all(r.lr == [0.1] for r in recorder.steps)


def test_evaluates_every_epoch_by_default(data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(data_dir, tmp_path, problem={"batch_size": 1000})
    config["training"] = {"epochs": 3, "seed": 0, "device": "cpu", "eval_max_batches": 1}
    recorder = Recorder()
    setup = build_run(parse_config(config))
    train(setup, [recorder])
    per_epoch = setup.steps_per_epoch
    assert [r.step for r in recorder.evals] == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert [r.epoch for r in recorder.evals] == [0, 1, 2, 3]
    assert recorder.end is not None and recorder.end.epochs == 3


def test_training_reduces_the_loss(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, training={"steps": 60, "eval_every_steps": 60})
    first, last = recorder.evals[0].splits["train_eval"].loss, recorder.evals[-1].splits["train_eval"].loss
    assert last < first


def test_same_seed_gives_identical_records(data_dir: Path, tmp_path: Path) -> None:
    first = run(data_dir, tmp_path)
    second = run(data_dir, tmp_path)
    assert [(r.step, r.loss) for r in first.steps] == [(r.step, r.loss) for r in second.steps]
    assert [r.splits for r in first.evals] == [r.splits for r in second.evals]
    third = run(data_dir, tmp_path, training={"seed": 1})
    assert [r.loss for r in first.steps] != [r.loss for r in third.steps]


def test_step_and_epoch_schedules_change_the_learning_rate(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, schedule={"name": "StepLR", "interval": "step", "step_size": 4, "gamma": 0.5})
    assert [r.lr[0] for r in recorder.steps] == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)
    config = tiny_config(data_dir, tmp_path, problem={"batch_size": 1000}, schedule={"name": "ExponentialLR", "gamma": 0.5})
    config["training"] = {"epochs": 2, "seed": 0, "device": "cpu", "eval_max_batches": 1}
    recorder = Recorder()
    setup = build_run(parse_config(config))
    train(setup, [recorder])
    by_epoch = {r.epoch: r.lr[0] for r in recorder.steps}
    assert by_epoch == pytest.approx({0: 0.1, 1: 0.05})


def test_reported_loss_includes_weight_decay(data_dir: Path, tmp_path: Path) -> None:
    setup = build_run(parse_config(tiny_config(data_dir, tmp_path)))
    setup.problem.weight_decay = 0.5
    setup.problem.decayed_parameters = [p for p in setup.problem.model.parameters() if p.ndim > 1]
    expected_term = 0.25 * sum(float(p.detach().pow(2).sum()) for p in setup.problem.decayed_parameters)
    inputs, targets = next(iter(torch.utils.data.DataLoader(setup.problem.splits.train, batch_size=32)))
    with torch.no_grad():
        data_loss = float(setup.problem.loss_function(setup.problem.model(inputs), targets))
    recorder = Recorder()
    from cockpit_cli.training.loop import Trainer

    trainer = Trainer(setup, [recorder])
    trainer.train_step(inputs, targets)
    assert recorder.steps[0].loss == pytest.approx(data_loss + expected_term, rel=1e-5)


def test_nonfinite_loss_ends_the_run_as_diverged(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, optimizer={"lr": 1e6}, problem={"input_scale": 1000.0}, training={"steps": 40})
    assert recorder.end is not None and recorder.end.status is RunStatus.DIVERGED
    assert "the loss became" in recorder.end.message and "learning rate" in recorder.end.message
    assert recorder.steps[-1].loss != recorder.steps[-1].loss or abs(recorder.steps[-1].loss) == float("inf")
    assert recorder.end.steps == len(recorder.steps) - 1  # the diverged step is recorded, not taken


def test_ctrl_c_ends_the_run_as_interrupted(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, Recorder(interrupt_at=3))
    assert recorder.end is not None and recorder.end.status is RunStatus.INTERRUPTED
    assert len(recorder.steps) == 4


def test_an_error_marks_the_run_failed_and_propagates(data_dir: Path, tmp_path: Path) -> None:
    class Broken(Recorder):
        def on_eval(self, record: EvalRecord) -> None:
            if record.step > 0:
                raise RuntimeError("disk on fire")

    recorder = Broken()
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(data_dir, tmp_path, recorder)
    assert recorder.end is not None and recorder.end.status is RunStatus.FAILED
    assert recorder.end.message == "RuntimeError: disk on fire"


def test_evaluations_record_outcomes_of_a_fixed_validation_subset(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, training={"track_samples": 100})
    for record in recorder.evals:
        assert record.samples is not None and len(record.samples) == 100
        assert set(record.samples) <= {"0", "1", "?"}
    assert recorder.meta is not None
    indices = recorder.meta.notes["samples"]["indices"]
    assert len(indices) == 100 and indices == sorted(indices)
    # only the first 64 validation examples are evaluated (eval_max_batches=2 at batch 32)
    expected_unknown = sum(1 for i in indices if i >= 64)
    assert recorder.evals[0].samples.count("?") == expected_unknown
    again = run(data_dir, tmp_path, training={"track_samples": 100})
    assert again.meta.notes["samples"]["indices"] == indices  # seeded: the same samples every run
    none = run(data_dir, tmp_path, training={"track_samples": 0})
    assert all(record.samples is None for record in none.evals)


@pytest.mark.parametrize("policy", ["skip", "continue"])
def test_nonfinite_policy_keeps_the_run_going(data_dir: Path, tmp_path: Path, policy: str) -> None:
    recorder = run(data_dir, tmp_path, optimizer={"lr": 1e6}, problem={"input_scale": 1000.0}, training={"steps": 40, "on_nonfinite": policy})
    assert recorder.end is not None and recorder.end.status is RunStatus.COMPLETED
    assert [r.step for r in recorder.steps] == list(range(40))
    nonfinite = [r for r in recorder.steps if not math.isfinite(r.loss)]
    assert nonfinite, "the setting should produce non-finite losses"
    (warning,) = recorder.end.warnings
    assert warning.startswith(f"{len(nonfinite)} steps had a non-finite {'loss or gradient' if policy == 'skip' else 'loss'} and were")


def test_skipped_steps_leave_the_parameters_alone(data_dir: Path, tmp_path: Path) -> None:
    setup = build_run(parse_config(tiny_config(data_dir, tmp_path, training={"on_nonfinite": "skip"})))
    from cockpit_cli.training.loop import Trainer

    trainer = Trainer(setup, [Recorder()])
    before = [p.detach().clone() for p in setup.problem.model.parameters()]
    inputs, targets = next(iter(torch.utils.data.DataLoader(setup.problem.splits.train, batch_size=32)))
    trainer.train_step(inputs * float("nan"), targets)
    assert all(torch.equal(a, b) for a, b in zip(before, setup.problem.model.parameters()))
    assert trainer.step == 1 and trainer.nonfinite_steps == 1


@pytest.mark.parametrize("policy", ["skip", "continue"])
def test_a_finite_loss_whose_gradient_overflows_is_skipped_under_skip(data_dir: Path, tmp_path: Path, policy: str) -> None:
    """A loss of 1e21 can be finite while its gradient is not; applying that update makes every
    later loss NaN (a quick-start run at lr 3 skipped 177 of 192 steps so). ``skip`` drops it."""
    setup = build_run(parse_config(tiny_config(data_dir, tmp_path, training={"on_nonfinite": policy})))
    from cockpit_cli.training.loop import Trainer

    trainer = Trainer(setup, [Recorder()])
    parameters = list(setup.problem.model.parameters())
    inputs, targets = next(iter(torch.utils.data.DataLoader(setup.problem.splits.train, batch_size=32)))
    overflow = parameters[0].register_hook(lambda grad: grad * math.inf)
    before = [p.detach().clone() for p in parameters]
    trainer.train_step(inputs, targets)
    kept = all(torch.equal(a, b) for a, b in zip(before, parameters))
    assert (kept, trainer.nonfinite_steps) == ((True, 1) if policy == "skip" else (False, 0))
    overflow.remove()
    trainer.train_step(inputs, targets)  # a finite gradient again: its update is taken
    assert trainer.step == 2 and not all(torch.equal(a, b) for a, b in zip(before, parameters))


def test_ctrl_c_while_training_asks_for_a_stop_between_steps_and_twice_stops_at_once() -> None:
    """The first SIGINT only sets the flag the loop reads after each step (an exception raised
    wherever the signal lands can be lost); a second raises at once; the old handler returns."""
    import os
    import signal

    from cockpit_cli.launch import StopAfterStep

    before = signal.getsignal(signal.SIGINT)
    with StopAfterStep() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is before


def trainer_for(data_dir: Path, tmp_path: Path, recorder: Recorder | None = None, **sections):
    from cockpit_cli.training.loop import Trainer

    setup = build_run(parse_config(tiny_config(data_dir, tmp_path, **sections)))
    return Trainer(setup, [recorder or Recorder()])


def test_a_diverged_run_records_its_steps_in_order_when_alpha_waits_for_the_next_step(data_dir: Path, tmp_path: Path) -> None:
    """A step's record waits for the next step's Alpha; the diverged step's record comes after it."""
    recorder = run(data_dir, tmp_path, optimizer={"lr": 1e6}, problem={"input_scale": 1000.0}, training={"steps": 40}, instruments={"preset": "economy"})
    assert recorder.end is not None and recorder.end.status is RunStatus.DIVERGED
    assert len(recorder.steps) >= 2 and [r.step for r in recorder.steps] == list(range(len(recorder.steps)))
    assert "Alpha" in recorder.steps[0].quantities
    assert not any("non-finite loss" in warning for warning in recorder.end.warnings)  # the message says it


@pytest.mark.parametrize(("policy", "action"), [("skip", "skipped"), ("continue", "taken anyway")])
def test_the_warning_says_what_became_of_non_finite_steps(data_dir: Path, tmp_path: Path, policy: str, action: str) -> None:
    recorder = run(data_dir, tmp_path, optimizer={"lr": 1e6}, problem={"input_scale": 1000.0}, training={"steps": 20, "on_nonfinite": policy})
    assert recorder.end is not None and recorder.end.warnings[0].endswith(f"and were {action} (training.on_nonfinite: {policy})")


def test_a_skipped_step_still_steps_the_learning_rate_schedule(data_dir: Path, tmp_path: Path) -> None:
    """The schedule follows the step count, so a run with skipped steps keeps the planned rates."""
    trainer = trainer_for(data_dir, tmp_path, training={"on_nonfinite": "skip"}, schedule={"name": "StepLR", "interval": "step", "step_size": 1, "gamma": 0.5})
    inputs, targets = next(iter(torch.utils.data.DataLoader(trainer.problem.splits.train, batch_size=32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning of a schedule stepped before its optimizer is not for the user
        trainer.train_step(inputs * float("nan"), targets)
    assert trainer.setup.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_evaluation_runs_the_model_in_eval_mode_and_training_in_train_mode(data_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(data_dir, tmp_path)
    modes: list[bool] = []
    trainer.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.model.train()
    trainer.evaluate()
    assert modes and not any(modes) and trainer.model.training
    trainer.model.eval()
    modes.clear()
    inputs, targets = next(iter(torch.utils.data.DataLoader(trainer.problem.splits.train, batch_size=32)))
    trainer.train_step(inputs, targets)
    assert modes == [True]


def test_evaluated_losses_include_weight_decay(data_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(data_dir, tmp_path, training={"eval_max_batches": 1})
    plain = trainer.evaluate()
    trainer.problem.weight_decay = 0.5
    trainer.problem.decayed_parameters = [p for p in trainer.model.parameters() if p.ndim > 1]
    term = 0.25 * sum(float(p.detach().pow(2).sum()) for p in trainer.problem.decayed_parameters)
    decayed = trainer.evaluate()
    for split in ("train_eval", "valid", "test"):
        assert decayed.splits[split].loss == pytest.approx(plain.splits[split].loss + term, rel=1e-6)
        assert decayed.splits[split].accuracy == plain.splits[split].accuracy


def test_a_problem_without_accuracy_evaluates_none(data_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(data_dir, tmp_path, problem={"name": "quadratic_deep", "batch_size": 32})
    record = trainer.evaluate()
    assert all(metrics.accuracy is None and math.isfinite(metrics.loss) for metrics in record.splits.values())
    assert record.samples is None and trainer.sample_indices == []


def test_tracked_outcomes_are_the_validation_samples_predictions(data_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(data_dir, tmp_path, training={"track_samples": 50, "eval_max_batches": None})
    record = trainer.evaluate()
    valid = trainer.problem.splits.valid
    with torch.no_grad():
        expected = "".join("1" if int(trainer.model(valid[i][0][None]).argmax()) == int(valid[i][1]) else "0" for i in trainer.sample_indices)
    assert record.samples == expected and len(set(expected)) == 2  # some right, some wrong
    other = trainer_for(data_dir, tmp_path, training={"track_samples": 50, "seed": 1})
    assert other.sample_indices != trainer.sample_indices  # the choice follows the run's seed


def test_tracked_samples_beyond_the_evaluated_ones_are_unknown(data_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(data_dir, tmp_path)
    trainer.sample_indices = [0, 2, 3, 4]
    assert trainer._tracked_outcomes(torch.tensor([True, False, False])) == "10??"  # 3 samples evaluated: positions 3 and 4 unknown


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"schedule": {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 12, "interval": "step"}}, None),
        ({"schedule": {"name": "StepLR", "step_size": 1, "gamma": 0.5}, "problem": {"train_subset": 96}, "training": {"steps": 7}}, (0.1, 0.025, 0.025, 0.1)),  # 3 steps per epoch: 3 epochs begun
        ({"schedule": {"name": "CosineAnnealingLR", "T_max": 2}, "problem": {"train_subset": 96}, "training": {"steps": 6}}, (0.1, 0.05, 0.05, 0.1)),  # 2 epochs
    ],
)
def test_the_learning_rate_plan_of_the_dry_run_is_what_training_uses(data_dir: Path, tmp_path: Path, sections: dict, expected: tuple | None) -> None:
    setup = build_run(parse_config(tiny_config(data_dir, tmp_path, **sections)))
    plan = setup.learning_rates
    recorder = Recorder()
    train(setup, [recorder])
    rates = [record.lr[0] for record in recorder.steps]
    assert (plan.first, plan.last, plan.lowest, plan.highest) == pytest.approx((rates[0], rates[-1], min(rates), max(rates)))
    if expected is not None:
        assert (plan.first, plan.last, plan.lowest, plan.highest) == pytest.approx(expected)
    assert plan.describe().startswith(f"{plan.first:.4g} at the start, {plan.last:.4g} at the end")


@pytest.mark.parametrize("limit", [None, 1e-3, 1e3])
def test_clip_grad_norm_scales_a_larger_gradient_down_before_the_update(data_dir: Path, tmp_path: Path, limit: float | None) -> None:
    """SGD steps -lr times the gradient, scaled to norm ``limit`` where its norm is larger; the
    instruments describe the gradient as the backward pass formed it, and Alpha the update taken."""
    trainer = trainer_for(data_dir, tmp_path, training={"clip_grad_norm": limit}, instruments={"preset": "economy"})
    parameters = list(trainer.model.parameters())
    inputs, targets = next(iter(torch.utils.data.DataLoader(trainer.setup.problem.splits.train, batch_size=32)))
    for _ in range(2):
        before = [p.detach().clone() for p in parameters]
        trainer.train_step(inputs, targets)
        gradient = math.sqrt(sum(float(p.grad.square().sum()) for p in parameters))  # after the step: as clipped
        update = math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(parameters, before)))
        expected = 0.1 * (gradient if limit is None else min(gradient, limit))
        assert update == pytest.approx(expected, rel=1e-5)
        if limit == 1e-3:
            assert gradient == pytest.approx(limit, rel=1e-5)
    trainer.tracker.flush()
    assert trainer.tracker.instruments is not None and trainer.tracker.failure is None


def test_a_clipped_run_records_the_gradients_before_clipping_and_alpha_of_the_update(data_dir: Path, tmp_path: Path) -> None:
    recorder = run(data_dir, tmp_path, training={"clip_grad_norm": 1e-3}, instruments={"preset": "economy"})
    assert recorder.end.status == RunStatus.COMPLETED and recorder.end.warnings == []
    tracked = [record.quantities for record in recorder.steps if "Alpha" in record.quantities]
    assert len(tracked) == 11  # the last step's Alpha needs a next step
    assert all(math.sqrt(sum(n * n for n in q["GradNorm"])) > 10 * 1e-3 for q in tracked)  # as the backward pass formed them
    assert all(math.isfinite(q["Alpha"]) for q in tracked)  # its start slopes along the clipped update (tested in test_instruments_alpha)
