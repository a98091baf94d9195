"""Checkpoints and `cockpit run --resume`: an interrupted, resumed run equals one left alone."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.storage.reader import read_run
from conftest import tiny_config, write_config

runner = CliRunner()


class Interrupt:
    """Observer that presses Ctrl-C once the run reaches a step."""

    def __init__(self, at: int):
        self.at = at

    def on_start(self, meta) -> None: ...
    def on_eval(self, record) -> None: ...
    def on_end(self, end) -> None: ...

    def on_step(self, record) -> None:
        if record.step == self.at:
            raise KeyboardInterrupt


class Pause(Interrupt):
    """Observer that waits ``seconds`` once the run reaches a step."""

    def __init__(self, at: int, seconds: float):
        super().__init__(at)
        self.seconds = seconds

    def on_step(self, record) -> None:
        if record.step == self.at:
            time.sleep(self.seconds)


def without_time(records: list[dict]) -> list[dict]:
    cleaned = []
    for record in records:
        record = {k: v for k, v in record.items() if k != "time"}
        quantities = {k: v for k, v in record.get("quantities", {}).items() if k != "Time"}
        cleaned.append({**record, "quantities": quantities})
    return cleaned


ECONOMY = {"preset": "economy", "every": 2, "offset": 1}  # step 13's Alpha spans the checkpoint after step 13
MONTE_CARLO = {"preset": "business", "every": 2, "curvature": "ggn_mc"}  # draws from the random state at every tracked step


@pytest.mark.parametrize(
    ("optimizer", "instruments"),
    [({"name": "SGD", "lr": 0.1}, ECONOMY), ({"name": "Adam", "lr": 0.01}, ECONOMY), ({"name": "SGD", "lr": 0.1}, MONTE_CARLO)],
)
def test_interrupted_and_resumed_run_equals_one_left_alone(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: dict, instruments: dict) -> None:
    sections = {
        "training": {"steps": 30, "eval_every_steps": 10, "checkpoint_every": 7},
        "instruments": instruments,
        "optimizer": optimizer,
        "schedule": {"name": "StepLR", "interval": "step", "step_size": 9, "gamma": 0.5},
    }
    alone = write_config(tmp_path / "alone.yaml", tiny_config(data_dir, tmp_path / "a", **sections))
    assert runner.invoke(app, ["run", str(alone), "--no-live"], catch_exceptions=False).exit_code == 0

    import cockpit_cli.training.loop as loop

    original = loop.train
    monkeypatch.setattr(loop, "train", lambda setup, observers, *args: original(setup, [*observers, Interrupt(at=17)], *args))
    broken = write_config(tmp_path / "broken.yaml", tiny_config(data_dir, tmp_path / "b", **sections))
    result = runner.invoke(app, ["run", str(broken), "--no-live"], catch_exceptions=False)
    assert result.exit_code == 130
    assert f"continue it from its last checkpoint with: cockpit run --resume {tmp_path / 'b' / 'run'}" in result.output.replace("\n", "")
    monkeypatch.setattr(loop, "train", original)
    assert read_run(tmp_path / "b" / "run").status == "interrupted"

    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "b" / "run"), "--no-live"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    left_alone, resumed = read_run(tmp_path / "a" / "run"), read_run(tmp_path / "b" / "run")
    assert resumed.status == "completed" and len(resumed.manifest["resumed_at"]) == 1
    assert [r["step"] for r in resumed.steps] == list(range(30))
    for a, b in zip(without_time(left_alone.steps), without_time(resumed.steps)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9), a["step"]
        assert a["lr"] == b["lr"]
        for name, value in a["quantities"].items():
            if isinstance(value, float) and math.isfinite(value):
                assert b["quantities"][name] == pytest.approx(value, rel=1e-4, abs=1e-7), (a["step"], name)
            elif isinstance(value, list) and all(isinstance(item, float) and math.isfinite(item) for item in value):  # per parameter
                assert b["quantities"][name] == pytest.approx(value, rel=1e-4, abs=1e-7), (a["step"], name)
        assert set(a["quantities"]) == set(b["quantities"]), a["step"]
    assert [e["step"] for e in left_alone.evals] == [e["step"] for e in resumed.evals] == [0, 10, 20, 30]
    for key in ("loss", "accuracy"):
        expected = [e["splits"]["valid"][key] for e in left_alone.evals]
        assert [e["splits"]["valid"][key] for e in resumed.evals] == pytest.approx(expected, rel=1e-6)
    assert resumed.summary["final"] == left_alone.summary["final"]


def test_a_resumed_run_goes_on_counting_non_finite_steps_and_time(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of steps skipped for a non-finite loss (in the run's warnings) includes those
    before the checkpoint, and the time since the start goes on from the checkpoint's."""
    sections = {"training": {"steps": 20, "checkpoint_every": 5, "on_nonfinite": "skip"}, "optimizer": {"lr": 1e6}, "problem": {"input_scale": 1000.0}}
    alone = write_config(tmp_path / "alone.yaml", tiny_config(data_dir, tmp_path / "a", **sections))
    assert runner.invoke(app, ["run", str(alone), "--no-live"], catch_exceptions=False).exit_code == 0
    import cockpit_cli.training.loop as loop

    original = loop.train
    monkeypatch.setattr(loop, "train", lambda setup, observers, *args: original(setup, [*observers, Pause(5, 1.0), Interrupt(at=12)], *args))
    broken = write_config(tmp_path / "broken.yaml", tiny_config(data_dir, tmp_path / "b", **sections))
    assert runner.invoke(app, ["run", str(broken), "--no-live"], catch_exceptions=False).exit_code == 130
    monkeypatch.setattr(loop, "train", original)
    assert runner.invoke(app, ["run", "--resume", str(tmp_path / "b" / "run"), "--no-live"], catch_exceptions=False).exit_code == 0
    left_alone, resumed = read_run(tmp_path / "a" / "run"), read_run(tmp_path / "b" / "run")
    skipped = sum(not math.isfinite(record["loss"]) for record in left_alone.steps)
    assert skipped > 10  # most of them before the checkpoint at step 10
    assert resumed.manifest["warnings"] == left_alone.manifest["warnings"]
    assert resumed.manifest["warnings"][0].startswith(f"{skipped} steps had a non-finite loss")
    times = [record["time"] for record in resumed.steps]
    assert times == sorted(times) and times[10] >= 1.0  # step 10, the first after the checkpoint, comes after the pause


def test_resume_errors(data_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "r", training={"steps": 3, "checkpoint_every": 1}))
    assert runner.invoke(app, ["run", str(config), "--no-live"], catch_exceptions=False).exit_code == 0
    manifest_path = tmp_path / "r" / "run" / "run.json"
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "completed its 3 steps; there is nothing to resume" in result.output
    assert "--set training.steps=N" in result.output
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "diverged"}))
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "diverged; resuming it would repeat the same steps" in result.output
    manifest_path.write_text(json.dumps({**manifest, "status": "completed"}))
    (tmp_path / "r" / "run" / "summary.json").unlink()  # as a run killed at its very end leaves it
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "completed its 3 steps; there is nothing to resume" in result.output
    manifest_path.write_text(json.dumps({**manifest, "status": "interrupted"}))
    (tmp_path / "r" / "run" / "checkpoint.pt").unlink()
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "has no checkpoint to resume from" in result.output
    result = runner.invoke(app, ["run", str(config), "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "--resume continues a run with its own config" in result.output
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run"), "--set", "training.steps=9"], catch_exceptions=False)
    assert result.exit_code == 2 and "--resume continues a run with its own config" in result.output
    result = runner.invoke(app, ["run"], catch_exceptions=False)
    assert result.exit_code == 2 and "needs a CONFIG file" in result.output
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "checkpoint.pt").write_bytes((tmp_path / "c.yaml").read_bytes())
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "not_a_run")], catch_exceptions=False)
    assert result.exit_code == 2 and "is not a run directory" in result.output
    (tmp_path / "r" / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["run", "--resume", str(tmp_path / "r" / "run")], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot be read" in result.output


def test_a_diverged_run_with_a_checkpoint_is_not_offered_a_resume(data_dir: Path, tmp_path: Path) -> None:
    sections = {"training": {"steps": 20, "checkpoint_every": 1}, "optimizer": {"lr": 1e6}, "problem": {"input_scale": 1000.0}}
    config = write_config(tmp_path / "c.yaml", tiny_config(data_dir, tmp_path / "r", **sections))
    result = runner.invoke(app, ["run", str(config), "--no-live"], catch_exceptions=False)
    assert result.exit_code == 1 and "run diverged" in result.output
    assert (tmp_path / "r" / "run" / "checkpoint.pt").exists() and "--resume" not in result.output  # it would diverge again


def test_same_config_and_seed_write_identical_records(data_dir: Path, tmp_path: Path) -> None:
    sections = {"training": {"steps": 12, "eval_every_steps": 6}, "instruments": {"preset": "full", "every": 3}}
    for name in ("one", "two"):
        path = write_config(tmp_path / f"{name}.yaml", tiny_config(data_dir, tmp_path / name, **sections))
        assert runner.invoke(app, ["run", str(path), "--no-live"], catch_exceptions=False).exit_code == 0
    one, two = read_run(tmp_path / "one" / "run"), read_run(tmp_path / "two" / "run")
    assert without_time(one.steps) == without_time(two.steps)
    assert [{k: v for k, v in e.items() if k != "time"} for e in one.evals] == [{k: v for k, v in e.items() if k != "time"} for e in two.evals]


def test_adaptive_histogram_range_survives_a_checkpoint() -> None:
    from cockpit_cli.instruments.quantities.grad_hist_1d import GradHist1d
    from cockpit_cli.instruments.schedules import Schedule

    adapted = GradHist1d(Schedule(), {"adaptive": True})
    adapted.spec.low, adapted.spec.high = -0.25, 0.25
    fresh = GradHist1d(Schedule(), {"adaptive": True})
    fresh.load_state_dict(adapted.state_dict())
    assert (fresh.spec.low, fresh.spec.high, fresh.spec.bins) == (-0.25, 0.25, 100)


def test_a_run_resumed_twice_in_one_epoch_equals_one_left_alone(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints come every ``checkpoint_every`` steps; one written after a resume counts the
    batches the resume skipped, so that a second resume skips them all again."""
    from cockpit_cli.training.checkpoint import load_checkpoint
    import cockpit_cli.training.loop as loop

    sections = {"training": {"steps": 24, "eval_every_steps": 12, "checkpoint_every": 7}}  # all in the first epoch (200 steps)
    alone = write_config(tmp_path / "alone.yaml", tiny_config(data_dir, tmp_path / "a", **sections))
    assert runner.invoke(app, ["run", str(alone), "--no-live"], catch_exceptions=False).exit_code == 0
    original = loop.train
    run_dir = tmp_path / "b" / "run"
    for number, interrupt_at in enumerate((10, 17)):
        monkeypatch.setattr(loop, "train", lambda setup, observers, *args, at=interrupt_at: original(setup, [*observers, Interrupt(at=at)], *args))
        arguments = ["run", "--resume", str(run_dir)] if number else ["run", str(write_config(tmp_path / "b.yaml", tiny_config(data_dir, tmp_path / "b", **sections)))]
        assert runner.invoke(app, [*arguments, "--no-live"], catch_exceptions=False).exit_code == 130
        checkpoint = load_checkpoint(run_dir)
        assert (checkpoint["step"], checkpoint["batches_in_epoch"]) == (7 * (number + 1),) * 2
    monkeypatch.setattr(loop, "train", original)
    assert runner.invoke(app, ["run", "--resume", str(run_dir), "--no-live"], catch_exceptions=False).exit_code == 0
    left_alone, resumed = read_run(tmp_path / "a" / "run"), read_run(run_dir)
    assert [r["step"] for r in resumed.steps] == list(range(24))
    assert [r["loss"] for r in resumed.steps] == pytest.approx([r["loss"] for r in left_alone.steps], rel=1e-6)


def test_a_checkpoint_at_the_end_of_an_epoch_is_resumed_without_repeating_its_evaluation(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint after an epoch's last step comes before that epoch's evaluation; the
    resumed run evaluates again, so the evaluation written after the checkpoint is dropped."""
    import cockpit_cli.training.loop as loop

    sections = {"problem": {"train_subset": 128}, "training": {"steps": 12, "eval_every_steps": None, "eval_every_epochs": 1, "checkpoint_every": 4}}  # 4 steps per epoch
    alone = write_config(tmp_path / "alone.yaml", tiny_config(data_dir, tmp_path / "a", **sections))
    assert runner.invoke(app, ["run", str(alone), "--no-live"], catch_exceptions=False).exit_code == 0
    original = loop.train
    monkeypatch.setattr(loop, "train", lambda setup, observers, *args: original(setup, [*observers, Interrupt(at=9)], *args))
    broken = write_config(tmp_path / "b.yaml", tiny_config(data_dir, tmp_path / "b", **sections))
    assert runner.invoke(app, ["run", str(broken), "--no-live"], catch_exceptions=False).exit_code == 130
    monkeypatch.setattr(loop, "train", original)
    run_dir = tmp_path / "b" / "run"
    assert [e["step"] for e in read_run(run_dir).evals] == [0, 4, 8]  # the one at step 8 came after the checkpoint
    import cockpit_cli.runner as runner_module

    seen = []
    original_diagnosis = runner_module.live_diagnosis
    monkeypatch.setattr(runner_module, "live_diagnosis", lambda config, alert, history=None: seen.append(history) or original_diagnosis(config, alert, history))
    assert runner.invoke(app, ["run", "--resume", str(run_dir), "--no-live"], catch_exceptions=False).exit_code == 0
    (history,) = seen  # the live diagnosis starts from the records kept before the checkpoint
    assert [r["step"] for r in history[0]] == list(range(8)) and [e["step"] for e in history[1]] == [0, 4]
    left_alone, resumed = read_run(tmp_path / "a" / "run"), read_run(run_dir)
    assert [e["step"] for e in left_alone.evals] == [e["step"] for e in resumed.evals] == [0, 4, 8, 12]
    assert [e["epoch"] for e in resumed.evals] == [0, 1, 2, 3]
    assert [e["splits"]["valid"]["loss"] for e in resumed.evals] == pytest.approx([e["splits"]["valid"]["loss"] for e in left_alone.evals], rel=1e-6)
    assert resumed.summary["final"] == left_alone.summary["final"]
