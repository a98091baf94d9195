"""`cockpit watch` on finished, cut-off and growing run directories; the plain log of `cockpit run`."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from cockpit_cli.cli import app
from cockpit_cli.display.watch import JsonLinesFollower, RunFollower
from cockpit_cli.runner import use_live_display
from cockpit_cli.storage import schema

runner = CliRunner()


def test_plain_log_then_watch_a_finished_and_a_cut_off_run(make_config, tmp_path: Path) -> None:
    config = make_config(instruments={"preset": "economy"}, training={"steps": 6})
    result = runner.invoke(app, ["run", str(config), "--live"], catch_exceptions=False)  # not a terminal: plain log
    assert result.exit_code == 0, result.output
    assert "--live needs a terminal" in result.output
    step_lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2  # step 0, then step 5: a multiple of log_every and the last
    assert "alpha" in step_lines[0] and "grad-norm" in step_lines[0] and "norm-test" in step_lines[0]
    assert "STEP SIZE" not in result.output and "cockpit diagnose" in result.output
    run_dir = tmp_path / "results" / "run"

    watched = runner.invoke(app, ["watch", str(run_dir)], env={"COLUMNS": "160"}, catch_exceptions=False)
    assert watched.exit_code == 0, watched.output
    for text in ("Cockpit for SGD", "STEP SIZE", "GRADIENTS", "CURVATURE", "step 6/6", "completed", "mnist1d_mlp", "best valid"):
        assert text in watched.output, text
    assert "tracked with preset business" in watched.output
    assert f"cockpit diagnose {run_dir}" in watched.output.replace("\n", "")

    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    steps = (cut / schema.STEPS).read_bytes()
    (cut / schema.STEPS).write_bytes(steps[: len(steps) - 40])  # the last line loses its end
    watched = runner.invoke(app, ["watch", str(cut), "--no-follow"], env={"COLUMNS": "100"}, catch_exceptions=False)
    assert watched.exit_code == 0, watched.output
    assert "step 5/6" in watched.output and "cut-off" in watched.output and "Traceback" not in watched.output


def test_live_display_only_on_a_terminal_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal, pipe = Console(force_terminal=True, file=io.StringIO()), Console(force_terminal=False, file=io.StringIO())
    errors = Console(file=io.StringIO())
    monkeypatch.delenv("CI", raising=False)
    assert use_live_display(None, terminal, errors) and not use_live_display(False, terminal, errors)
    assert not use_live_display(None, pipe, errors) and not use_live_display(True, pipe, errors)
    monkeypatch.setenv("CI", "true")
    assert not use_live_display(None, terminal, errors) and use_live_display(True, terminal, errors)


def watch_while(write: Callable[[], None], run_dir: Path) -> Result:
    """Run ``cockpit watch run_dir`` while ``write`` writes the run in another thread; it must succeed."""
    writer = threading.Thread(target=write)
    writer.start()
    result = runner.invoke(app, ["watch", str(run_dir), "--interval", "0.05"], env={"COLUMNS": "120"}, catch_exceptions=False)
    writer.join()
    assert result.exit_code == 0, result.output
    return result


def test_bad_paths_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cockpit_cli.display.watch as watch

    started = time.monotonic()
    missing = runner.invoke(app, ["watch", str(tmp_path / "nope"), "--no-follow"])
    assert missing.exit_code == 2 and "error: run directory" in missing.output and "does not exist" in missing.output
    assert "waiting for" not in missing.output and time.monotonic() - started < 5
    monkeypatch.setattr(watch, "APPEAR_SECONDS", 0.3)
    missing = runner.invoke(app, ["watch", str(tmp_path / "nope"), "--interval", "0.05"])  # waited for, then the same error
    assert missing.exit_code == 2 and f"waiting for {tmp_path / 'nope'} to appear" in missing.output and "does not exist" in missing.output
    monkeypatch.setattr(watch, "APPEAR_SECONDS", 60.0)
    (tmp_path / "file.txt").write_text("x")
    assert "is a file, not a run directory" in runner.invoke(app, ["watch", str(tmp_path / "file.txt")]).output
    started = time.monotonic()
    empty = runner.invoke(app, ["watch", str(tmp_path)])  # a directory with other contents is no run being created
    assert empty.exit_code == 2 and "has no run.json" in empty.output and "Traceback" not in empty.output
    assert "waiting for" not in empty.output and time.monotonic() - started < 5


def test_a_watch_started_before_its_run_waits_for_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "soon"

    def start() -> None:
        time.sleep(0.3)
        run_dir.mkdir()  # created empty first, as a run does, then its manifest
        time.sleep(0.2)
        with (run_dir / schema.STEPS).open("w") as handle:
            handle.write(json.dumps({"step": 0, "epoch": 0, "loss": 1.0, "lr": [0.1], "time": 0.0, "quantities": {}}) + "\n")
        write_manifest(run_dir, "completed")

    result = watch_while(start, run_dir)
    assert result.output.startswith(f"waiting for {run_dir} to appear") and "completed" in result.output


def test_follower_waits_for_a_line_to_be_complete(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    follower = JsonLinesFollower(path)
    assert follower.read() == []  # not there yet
    path.write_text('{"step": 0}\n{"step"')
    assert follower.read() == [{"step": 0}]
    with path.open("a") as handle:
        handle.write(': 1}\n{"step": 2}\n')
    assert follower.read() == [{"step": 1}, {"step": 2}] and follower.read() == []


def test_follower_starts_over_when_the_file_is_rewritten_shorter(tmp_path: Path) -> None:
    """A resumed run cuts its records back to the checkpoint (an overwritten run starts afresh)."""
    path = tmp_path / "steps.jsonl"
    follower = JsonLinesFollower(path)
    path.write_text("".join(f'{{"step": {step}}}\n' for step in range(5)))
    assert len(follower.read()) == 5
    path.write_text('{"step": 0}\n{"step": 1}\n')
    assert follower.read() == [{"step": 0}, {"step": 1}]


def write_manifest(run_dir: Path, status: str) -> None:
    manifest = {"schema_version": 1, "status": status, "problem": "toy", "optimizer": "SGD", "total_steps": 20, "steps_per_epoch": 10, "heartbeat_at": "2000-01-01T00:00:00+00:00"}
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest))


def test_watching_a_run_that_is_resumed_shows_each_step_once(tmp_path: Path) -> None:
    """A resumed run cuts its records back to its checkpoint and writes them on from there."""
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    write_manifest(run_dir, "running")

    def write_steps(steps: range) -> None:
        lines = (json.dumps({"step": step, "epoch": 0, "loss": 1.0 / (step + 1), "lr": [0.1], "time": 0.01 * step, "quantities": {"Alpha": 0.5}}) for step in steps)
        (run_dir / schema.STEPS).write_text("".join(line + "\n" for line in lines))

    write_steps(range(12))
    follower = RunFollower(run_dir)
    follower.poll()
    assert follower.state.step == 11 and len(follower.state.series["loss"].values) == 12
    write_steps(range(8))  # cut back to the checkpoint after step 7 in place, then on to step 9
    with (run_dir / schema.STEPS).open("a") as handle:
        handle.write("".join(json.dumps({"step": step, "epoch": 0, "loss": 0.5, "lr": [0.1], "time": 1.0, "quantities": {"Alpha": 0.5}}) + "\n" for step in (8, 9)))
    follower.poll()
    assert follower.state.step == 9 and list(follower.state.series["loss"].steps) == list(range(10))
    assert sum(follower.state.alpha_counts) == 10
    write_steps(range(8))  # resumed again from step 8, as `cockpit run --resume` does it: a new file
    with (run_dir / schema.STEPS).open("a") as handle:
        handle.write("".join(json.dumps({"step": step, "epoch": 0, "loss": 0.25, "lr": [0.1], "time": 2.0, "quantities": {"Alpha": 0.5}}) + "\n" for step in range(8, 14)))
    os.replace(run_dir / schema.STEPS, run_dir / "steps.new")
    shutil.copy(run_dir / "steps.new", run_dir / schema.STEPS)  # another inode, longer than what was read
    follower.poll()
    loss = follower.state.series["loss"]
    assert list(loss.steps) == list(range(14)) and loss.values[8] == 0.25 and sum(follower.state.alpha_counts) == 14


def test_watch_follows_a_run_that_another_process_writes(tmp_path: Path) -> None:
    run_dir = tmp_path / "growing"
    run_dir.mkdir()
    write_manifest(run_dir, "running")

    def train() -> None:
        with (run_dir / schema.STEPS).open("a") as handle:
            for step in range(20):
                line = json.dumps({"step": step, "epoch": step // 10, "loss": 1.0, "lr": [0.1], "time": step * 0.01, "quantities": {"NormTest": 0.5}})
                handle.write(line[:10])
                handle.flush()
                time.sleep(0.005)
                handle.write(line[10:] + "\n")
                handle.flush()
        write_manifest(run_dir, "completed")

    result = watch_while(train, run_dir)
    assert "step 20/20" in result.output and "completed" in result.output

    follower = RunFollower(run_dir)  # a stale running run gets an alert
    write_manifest(run_dir, "running")
    follower.poll()
    assert any("no heartbeat" in text for _, text in follower.state.alert_list())


def test_follower_skips_blank_lines_and_counts_unreadable_ones(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 0}\n\n   \n{"step": 1, \n[1, 2]\n{"step": 2}\n')
    follower = JsonLinesFollower(path)
    assert follower.read() == [{"step": 0}, {"step": 2}] and follower.bad_lines == 2


def step_line(number: int, **fields: object) -> str:
    """Step ``number``'s record as a line; ``fields`` replace its entries."""
    record = {"step": number, "epoch": number // 10, "loss": 1.0, "lr": [0.1, 0.01], "time": 0.5 * number, "quantities": {}}
    return json.dumps({**record, **fields}) + "\n"


def test_run_follower_reads_every_field_and_the_end_of_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cockpit_cli.display.watch as watch

    monkeypatch.setattr(watch, "CHUNK_BYTES", 64)  # several chunks in one poll
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, "running")
    (run_dir / schema.STEPS).write_text("".join(step_line(step) for step in range(25)) + step_line(25, step="abc"))
    evaluation = {"step": 10, "epoch": 1, "time": 5.5, "splits": {"valid": {"loss": 0.5, "accuracy": 0.9}}}
    (run_dir / schema.EVALS).write_text(json.dumps(evaluation) + "\n")
    follower = RunFollower(run_dir)
    follower.poll()
    state = follower.state
    assert state.step == 24 and state.epoch == 2 and state.lr == [0.1, 0.01] and state.time == 12.0
    assert state.evals == [evaluation] and state.status == "running"
    manifest = json.loads((run_dir / schema.MANIFEST).read_text())
    manifest.update(status="interrupted", message="stopped by Ctrl-C", timings={"train_seconds": 12.25})
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest))
    follower.poll()
    assert (state.status, state.message, state.time) == ("interrupted", "stopped by Ctrl-C", 12.25)
    assert ("info", "steps.jsonl: a cut-off or unreadable line was ignored") in state.alert_list()
    assert not any("evals.jsonl" in text for _, text in state.alert_list())


def test_run_follower_keeps_its_manifest_while_it_is_rewritten_and_starts_over_when_evals_are(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, "running")
    (run_dir / schema.STEPS).write_text("".join(step_line(step) for step in range(3)))
    evals = [{"step": step, "epoch": 0, "time": 0.0, "splits": {"valid": {"loss": 1.0, "accuracy": 0.5}}} for step in (0, 2)]
    (run_dir / schema.EVALS).write_text("".join(json.dumps(item) + "\n" for item in evals))
    follower = RunFollower(run_dir)
    follower.poll()
    assert len(follower.state.evals) == 2
    (run_dir / schema.MANIFEST).write_text('{"schema_version": 1, "sta')  # caught in the middle of a rewrite
    (run_dir / schema.EVALS).write_text(json.dumps(evals[0]) + "\n")  # a resumed run cut its evaluations back
    follower.poll()
    assert follower.running and [item["step"] for item in follower.state.evals] == [0]
    assert list(follower.state.get("loss").steps) == [0, 1, 2]


def test_a_run_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / schema.MANIFEST).write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION + 1, "status": "completed"}))
    result = runner.invoke(app, ["watch", str(run_dir)])
    assert result.exit_code == 2 and "schema" in result.output and "Traceback" not in result.output


def test_follow_and_no_follow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--follow keeps watching a finished run (until Ctrl-C); --no-follow draws a running one once."""
    import cockpit_cli.display.watch as watch

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, "completed")
    (run_dir / schema.STEPS).write_text(step_line(0))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(watch.time, "sleep", sleep)
    console = Console(file=io.StringIO(), width=120)
    assert watch.watch_run(run_dir, console, follow=True, interval=0.25) == 0
    assert sleeps == [0.25] * 3 and "step 1/20" in console.file.getvalue()
    write_manifest(run_dir, "running")
    sleeps.clear()
    assert watch.watch_run(run_dir, Console(file=io.StringIO(), width=120), follow=False) == 0 and sleeps == []


def test_ctrl_c_while_waiting_for_the_run_directory_ends_the_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cockpit_cli.display.watch as watch
    from cockpit_cli.errors import ExitCode

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(watch.time, "sleep", interrupted)
    console = Console(file=io.StringIO(), width=120)
    assert watch.watch_run(tmp_path / "never", console, interval=0.05) == ExitCode.INTERRUPTED
    assert "waiting for" in console.file.getvalue()


def test_a_quantity_switched_off_during_the_run_says_so_in_the_watch(tmp_path: Path) -> None:
    """The manifest gets each warning as it arises; the watch shows it as an alert, and the
    quantities it names show the reason in their panels (they read 'waiting for the first
    tracked step' until the run ended)."""
    from cockpit_cli.display import panels

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_manifest(run_dir, "running")
    manifest = json.loads((run_dir / schema.MANIFEST).read_text())
    manifest["instruments"] = {"quantities": {"HessTrace": "every step", "NormTest": "every step"}, "unavailable": {}}
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest))
    (run_dir / schema.STEPS).write_text("".join(step_line(step) for step in range(3)))
    follower = RunFollower(run_dir)
    follower.poll()
    assert "waiting for the first tracked step" in panel_text(panels.hess_trace(follower.state))
    warning = "HessTrace switched off: failed at step 0 and was switched off: the loss was not computed by the loss module"
    manifest["warnings"] = [warning]
    (run_dir / schema.MANIFEST).write_text(json.dumps(manifest))
    follower.poll()
    follower.poll()  # said once
    assert follower.state.info.unavailable == {"HessTrace": "failed at step 0 and was switched off: the loss was not computed by the loss module"}
    assert follower.state.alert_list().count(("warning", warning)) == 1
    assert "unavailable: failed at step 0 and was switched off" in panel_text(panels.hess_trace(follower.state))


def panel_text(panel: object) -> str:
    """The words of a panel drawn 60 columns wide, on one line."""
    console = Console(width=60, file=io.StringIO(), record=True)
    console.print(panel)
    return " ".join(console.export_text().split())
