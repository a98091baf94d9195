"""The run directory: writer and reader round trip, and what a reader tolerates or refuses."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from cockpit_cli.errors import CockpitError
from cockpit_cli.storage import schema
from cockpit_cli.storage.reader import read_run
from cockpit_cli.storage.summary import summarize
from cockpit_cli.storage.totals import quantity_total
from cockpit_cli.storage.writer import RunWriter, close_abandoned_run, prepare_run_directory
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, RunStatus, SplitMetrics, StepRecord


def write_run(parent: Path, steps: int = 5, status: RunStatus = RunStatus.COMPLETED, end: bool = True) -> Path:
    run_dir = prepare_run_directory(parent, "r")
    writer = RunWriter(run_dir, {"problem": {"name": "p"}, "optimizer": {"name": "SGD"}, "training": {"seed": 3}}, "problem:\n  name: p\n", ["cockpit", "run"])
    writer.on_start(RunMeta("p", "SGD", 3, "cpu", steps, steps, 8, 10))
    writer.on_eval(EvalRecord(0, 0, 0.0, {"valid": SplitMetrics(2.0, 0.1, 10)}))
    for step in range(steps):
        writer.on_step(StepRecord(step, 0, 1.0 / (step + 1), [0.1], 0.1 * step))
    writer.on_eval(EvalRecord(steps, 1, 1.0, {"valid": SplitMetrics(1.5, 0.4, 10)}))
    if end:
        writer.on_end(RunEnd(status, steps, 1, None if status is RunStatus.COMPLETED else "why", 1.0))
    return run_dir


def test_round_trip(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path))
    assert run.status == "completed"
    assert run.manifest["schema_version"] == schema.SCHEMA_VERSION
    assert run.manifest["problem"] == "p" and run.manifest["seed"] == 3 and run.manifest["device"] == "cpu"
    assert run.manifest["steps_completed"] == 5
    assert run.config == {"problem": {"name": "p"}}
    assert [s["step"] for s in run.steps] == list(range(5))
    assert run.steps[1] == {"step": 1, "epoch": 0, "loss": 0.5, "lr": [0.1], "time": pytest.approx(0.1), "quantities": {}}
    assert [e["splits"]["valid"]["accuracy"] for e in run.evals] == [0.1, 0.4]
    assert run.summary is not None
    assert run.summary["final"]["valid"] == {"loss": 1.5, "accuracy": 0.4}
    assert run.summary["best"]["valid"]["accuracy_step"] == 5
    assert run.notes == []
    assert not (run.path / schema.LOCK).exists()


def test_a_running_run_is_readable_and_locked(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, end=False)
    run = read_run(run_dir)
    assert run.status == "running" and run.summary is None and len(run.steps) == 5
    assert (run_dir / schema.LOCK).exists()


def test_an_abandoned_run_is_closed_only_when_its_writer_is_gone(tmp_path: Path) -> None:
    """The launcher of a data-parallel run closes a run whose rank-0 writer was killed."""
    run_dir = write_run(tmp_path, end=False)  # the lock holds this (live) process's pid
    assert not close_abandoned_run(run_dir, RunStatus.FAILED, "process 1 of 2 failed")
    assert read_run(run_dir).status == "running"
    (run_dir / schema.LOCK).write_text("999999999", encoding="utf-8")  # a writer that is gone
    assert close_abandoned_run(run_dir, RunStatus.FAILED, "process 1 of 2 failed")
    run = read_run(run_dir)
    assert run.status == "failed" and run.manifest["message"] == "process 1 of 2 failed" and len(run.steps) == 5
    assert not (run_dir / schema.LOCK).exists()
    assert not close_abandoned_run(run_dir, RunStatus.INTERRUPTED, "again")  # an ended run is left alone
    assert not close_abandoned_run(tmp_path / "missing", RunStatus.FAILED, "no run")


def test_nonfinite_losses_survive(tmp_path: Path) -> None:
    run_dir = prepare_run_directory(tmp_path, "nan")
    writer = RunWriter(run_dir, {}, "")
    writer.on_step(StepRecord(0, 0, float("nan"), [1.0], 0.0))
    writer.on_end(RunEnd(RunStatus.DIVERGED, 0, 0, "the loss became nan", 0.1))
    run = read_run(run_dir)
    assert math.isnan(run.steps[0]["loss"]) and run.status == "diverged"
    assert run.manifest["message"] == "the loss became nan"


def test_cut_off_last_line_is_ignored_with_a_note(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, end=False)
    with open(run_dir / schema.STEPS, "a") as handle:
        handle.write('{"step": 5, "epo')
    run = read_run(run_dir)
    assert len(run.steps) == 5
    assert run.notes == ["steps.jsonl: the last line (line 6) is cut off and was ignored"]


def test_lost_step_records_of_a_run_are_noted(tmp_path: Path) -> None:
    """A file cut short after the run ended (the manifest counts 5 steps) reads with a note; a
    running run's manifest lags its records and gives none."""
    run_dir = write_run(tmp_path)
    lines = (run_dir / schema.STEPS).read_text().splitlines()
    (run_dir / schema.STEPS).write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    run = read_run(run_dir)
    assert len(run.steps) == 2
    assert run.notes == [
        "steps.jsonl: the last line (line 3) is cut off and was ignored",
        "steps.jsonl holds 2 of the 5 steps the run recorded: records were lost, and what follows uses those left",
    ]
    assert read_run(write_run(tmp_path / "running", end=False)).notes == []


def test_corrupted_middle_line_is_an_error(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path)
    lines = (run_dir / schema.STEPS).read_text().splitlines()
    lines[2] = "garbage"
    (run_dir / schema.STEPS).write_text("\n".join(lines) + "\n")
    with pytest.raises(CockpitError, match="steps.jsonl is corrupted at line 3"):
        read_run(run_dir)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / schema.MANIFEST).unlink(), "is not a run directory: it has no run.json"),
        (lambda d: (d / schema.MANIFEST).write_text("{not json"), "is corrupted: its manifest is not valid JSON"),
        (lambda d: (d / schema.MANIFEST).write_text("[1, 2]"), "is corrupted: expected a JSON object"),
        (lambda d: (d / schema.MANIFEST).write_text('{"status": "completed"}'), "has no valid schema_version"),
        (lambda d: (d / schema.MANIFEST).write_text('{"schema_version": 99}'), "newer than this cockpit understands"),
        (lambda d: (d / schema.SUMMARY).write_text("{"), "is corrupted: its summary is not valid JSON"),
    ],
)
def test_damaged_run_directories_are_clear_errors(tmp_path: Path, damage, message: str) -> None:
    run_dir = write_run(tmp_path)
    damage(run_dir)
    with pytest.raises(CockpitError, match=message):
        read_run(run_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CockpitError, match="does not exist"):
        read_run(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CockpitError, match="is a file, not a run directory"):
        read_run(tmp_path / "file")


def test_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    write_run(tmp_path)
    with pytest.raises(CockpitError, match="already exists") as caught:
        prepare_run_directory(tmp_path, "r")
    assert "--overwrite" in caught.value.hint
    fresh = prepare_run_directory(tmp_path, "r", overwrite=True)
    assert list(fresh.iterdir()) == []


def test_overwrite_refuses_foreign_directories_and_locked_runs(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(CockpitError, match="is not a run directory; refusing to overwrite it"):
        prepare_run_directory(tmp_path, "mine", overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    locked = write_run(tmp_path / "locked", end=False)  # its writer is open in this process
    with pytest.raises(CockpitError, match="is being written by a run of this process") as caught:
        prepare_run_directory(tmp_path / "locked", "r", overwrite=True)
    assert caught.value.hint == "end that run first"
    (locked / schema.LOCK).write_text("1\n", encoding="utf-8")  # pid 1: another live process
    with pytest.raises(CockpitError, match="is being written by process 1"):
        prepare_run_directory(tmp_path / "locked", "r", overwrite=True)
    assert (locked / schema.STEPS).exists()


def test_overwrite_replaces_a_run_whose_writer_is_gone(tmp_path: Path) -> None:
    """A writer killed leaves its lock behind: its process is gone, or the number is this very
    process's, which holds no writer of the run (a container's processes count from 1 again)."""
    import subprocess

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    for name, pid in (("killed", int(finished.stdout)), ("abandoned", os.getpid())):
        run_dir = write_run(tmp_path / name)
        (run_dir / schema.LOCK).write_text(f"{pid}\n", encoding="utf-8")
        assert list(prepare_run_directory(tmp_path / name, "r", overwrite=True).iterdir()) == []


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "..", "x y"])
def test_unsafe_run_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CockpitError, match="is not a safe directory name"):
        prepare_run_directory(tmp_path, name)


def test_output_parent_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(CockpitError, match="is a file, not a directory"):
        prepare_run_directory(tmp_path / "f", "r")


def test_json_lines_are_one_object_per_line(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path)
    for line in (run_dir / schema.EVALS).read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_a_running_run_with_a_stale_heartbeat_reads_as_crashed_or_still_running(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, end=False)
    assert read_run(run_dir).status == "running"
    manifest = json.loads((run_dir / schema.MANIFEST).read_text())
    manifest["heartbeat_at"] = "2020-01-01T00:00:00+00:00"
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest))
    assert read_run(run_dir).status == "crashed or still running"
    from cockpit_cli.diagnosis import diagnose

    assert diagnose(read_run(run_dir)).run["status"] == "crashed or still running"


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.storage.jsonio import JsonLinesAppender

    run_dir = prepare_run_directory(tmp_path, "full")
    writer = RunWriter(run_dir, {}, "")
    writer.on_step(StepRecord(0, 0, 1.0, [0.1], 0.0))
    original = JsonLinesAppender.append

    def no_space(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JsonLinesAppender, "append", no_space)
    with pytest.raises(CockpitError) as caught:
        writer.on_step(StepRecord(1, 0, 0.5, [0.1], 0.1))
    assert caught.value.message == f"cannot write the run directory {run_dir}: No space left on device"
    assert "everything written before is intact" in caught.value.hint
    monkeypatch.setattr(JsonLinesAppender, "append", original)
    writer.on_end(RunEnd(RunStatus.FAILED, 1, 0, caught.value.message, 0.1))
    run = read_run(run_dir)
    assert run.status == "failed" and [s["step"] for s in run.steps] == [0]


def test_a_vanished_run_directory_is_one_clear_error(tmp_path: Path) -> None:
    import shutil

    run_dir = prepare_run_directory(tmp_path, "gone")
    writer = RunWriter(run_dir, {}, "")
    shutil.rmtree(run_dir)
    with pytest.raises(CockpitError, match="cannot write the run directory .*: No such file or directory"):
        writer.on_eval(EvalRecord(0, 0, 0.0, {"valid": SplitMetrics(1.0, 0.5, 10)}))
    writer.on_end(RunEnd(RunStatus.FAILED, 0, 0, "gone", 0.0))  # nothing more to write; no second error


def test_summary_holds_each_split_s_best_values_and_the_mean_of_the_last_losses() -> None:
    evals = [
        {"step": 0, "splits": {"valid": {"loss": float("nan"), "accuracy": float("nan")}}},
        {"step": 5, "splits": {"valid": {"loss": 0.5, "accuracy": 0.8}}},
        {"step": 9, "splits": {"valid": {"loss": 0.9, "accuracy": 0.6}}},
    ]
    summary = summarize("completed", None, 10, 1, 1.0, [1.0, float("nan"), 3.0], evals)
    assert summary["best"]["valid"] == {"loss": 0.5, "loss_step": 5, "accuracy": 0.8, "accuracy_step": 5}
    assert summary["final"]["valid"]["loss"] == 0.9
    assert summary["final_minibatch_loss"] == 2.0  # the finite ones' mean


def test_quantity_totals() -> None:
    assert quantity_total("GradNorm", [3.0, 4.0]) == 5.0 and quantity_total("HessTrace", [1.0, 2.5]) == 3.5
    assert quantity_total("Alpha", 0.25) == 0.25
    assert quantity_total("GradNorm", [3.0, None]) is None and quantity_total("GradNorm", []) is None
    assert quantity_total("LayerStats", [1.0]) is None  # a list with no total


def test_reopening_for_a_resume_keeps_steps_before_and_evaluations_through_the_checkpoint(tmp_path: Path) -> None:
    from cockpit_cli.storage.writer import reopen_run_directory

    run_dir = write_run(tmp_path, steps=8, end=False)  # locked by this very process: a resume in it may go on
    with open(run_dir / schema.EVALS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 4, "epoch": 0, "time": 0.5, "splits": {}}) + "\n")
    steps, evals = reopen_run_directory(run_dir, keep_steps_below=4, keep_evals_through=4)
    assert [record["step"] for record in steps] == [0, 1, 2, 3]
    assert [record["step"] for record in evals] == [0, 4]  # the evaluation at the checkpoint's step stays
    run = read_run(run_dir)
    assert [s["step"] for s in run.steps] == [0, 1, 2, 3] and [e["step"] for e in run.evals] == [0, 4]
    (run_dir / schema.LOCK).write_text("1", encoding="utf-8")  # pid 1: another live process
    with pytest.raises(CockpitError, match="is being written by process 1"):
        reopen_run_directory(run_dir, 4, 4)


def test_a_resumed_writer_keeps_the_runs_creation_and_counts_its_resumes(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, steps=3)
    manifest = read_run(run_dir).manifest
    manifest.update(created_at="2020-01-01T00:00:00+00:00", timings={"started": 1.0}, command=["cockpit", "run", "c.yaml"])
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    for number in (1, 2):
        writer = RunWriter(run_dir, {"problem": {"name": "p"}}, "", command=["cockpit", "run", "--resume", str(run_dir)], resume_evals=[])
        writer.on_end(RunEnd(RunStatus.COMPLETED, 3, 1, None, 1.0))
        manifest = read_run(run_dir).manifest
        assert manifest["created_at"] == "2020-01-01T00:00:00+00:00" and manifest["timings"]["started"] == 1.0
        assert manifest["command"] == ["cockpit", "run", "c.yaml"]
        assert len(manifest["resumed_at"]) == number


def test_the_manifest_is_rewritten_while_steps_are_taken_and_counts_the_written_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = prepare_run_directory(tmp_path, "r")
    writer = RunWriter(run_dir, {"problem": {"name": "p"}}, "")
    monkeypatch.setattr(schema, "HEARTBEAT_SECONDS", -1.0)  # every step beats
    writer.on_step(StepRecord(0, 0, 1.0, [0.1], 0.1))
    writer.on_step(StepRecord(1, 0, 1.0, [0.1], 0.2))
    assert read_run(run_dir).manifest["steps_completed"] == 2
    writer.on_end(RunEnd(RunStatus.INTERRUPTED, 3, 0, "interrupted by the user", 1.0))  # the third step's update without its record
    assert read_run(run_dir).manifest["steps_completed"] == 2 and read_run(run_dir).summary["steps"] == 2


def test_an_output_directory_without_write_permission_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CockpitError, match="is not writable"):
        prepare_run_directory(tmp_path, "r")


def test_a_heartbeat_is_stale_after_six_beats_and_an_unreadable_one_never() -> None:
    from datetime import datetime, timedelta, timezone

    from cockpit_cli.storage.reader import STALE_HEARTBEAT_SECONDS, heartbeat_is_stale

    beat = datetime(2026, 1, 1, tzinfo=timezone.utc)
    manifest = {"heartbeat_at": beat.isoformat()}
    assert STALE_HEARTBEAT_SECONDS == 6 * schema.HEARTBEAT_SECONDS
    assert not heartbeat_is_stale(manifest, beat + timedelta(seconds=2 * schema.HEARTBEAT_SECONDS))  # a slow step or two
    assert heartbeat_is_stale(manifest, beat + timedelta(seconds=7 * schema.HEARTBEAT_SECONDS))
    assert not heartbeat_is_stale({"heartbeat_at": "yesterday"}) and not heartbeat_is_stale({})


def test_records_files_may_hold_blank_lines_but_only_objects(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path)
    lines = (run_dir / schema.STEPS).read_text().splitlines()
    (run_dir / schema.STEPS).write_text("\n".join([lines[0], "", "   ", *lines[1:]]) + "\n")
    assert [s["step"] for s in read_run(run_dir).steps] == [0, 1, 2, 3, 4] and read_run(run_dir).notes == []
    (run_dir / schema.STEPS).write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(CockpitError, match="steps.jsonl is corrupted at line 2: expected a JSON object"):
        read_run(run_dir)


def test_a_config_file_that_is_no_mapping_reads_as_empty_and_bad_yaml_as_a_note(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path)
    (run_dir / schema.CONFIG).write_text("- a\n- b\n")
    assert read_run(run_dir).config == {} and read_run(run_dir).notes == []
    (run_dir / schema.CONFIG).write_text("problem: [unclosed\n")
    assert read_run(run_dir).config == {} and read_run(run_dir).notes == ["config.yaml is not valid YAML and was ignored"]


def test_a_single_lost_step_record_is_noted(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path)
    lines = (run_dir / schema.STEPS).read_text().splitlines()
    (run_dir / schema.STEPS).write_text("\n".join(lines[:4]) + "\n")
    assert read_run(run_dir).notes == ["steps.jsonl holds 4 of the 5 steps the run recorded: records were lost, and what follows uses those left"]
