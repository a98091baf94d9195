"""The command line as a user runs it: help, problems, run, dry runs, bad input, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.config import parse_config
from cockpit_cli.storage.reader import read_run

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "run" in result.output and "problems" in result.output
    result = invoke("run", "--help")
    assert result.exit_code == 0
    for option in ("--set", "--out", "--name", "--dry-run", "--overwrite", "--traceback"):
        assert option in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("cockpit ")


def test_the_entry_point_turns_on_huge_pages_before_torch_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reads THP_MEM_ALLOC_ENABLE once, before its first allocation: the script sets it
    first thing (in a fresh process, before torch is imported), and keeps a value the user set."""
    probe = "import os, sys; sys.argv = ['cockpit', '--version']; from cockpit_cli import cli\ntry: cli.main()\nexcept SystemExit: pass\nprint(os.environ['THP_MEM_ALLOC_ENABLE'], 'torch' in sys.modules)"
    for preset, expected in ((None, "1 False"), ("0", "0 False")):
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if preset is not None:
            env["THP_MEM_ALLOC_ENABLE"] = preset
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert result.stdout.split("\n")[-2] == expected


def test_problems_table_and_json() -> None:
    result = runner.invoke(app, ["problems"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("quadratic_deep", "cifar10_3c3d", "svhn_wrn164", "mnist1d_mlp", "two_d_beale", "mnist_vae"):
        assert name in result.output
    assert "895,210" in result.output
    assert "BatchNorm" in result.output
    rows = json.loads(invoke("problems", "--json").output)["problems"]
    by_name = {row["name"]: row for row in rows}
    assert len(rows) == 19
    assert by_name["cifar10_3c3d"]["parameters"] == 895_210
    assert by_name["cifar10_3c3d"]["weight_decay"] == 0.002
    assert by_name["svhn_wrn164"]["batchnorm"] is True
    assert by_name["mnist_mlp"]["batch_size"] == 128 and by_name["mnist_mlp"]["epochs"] == 100
    assert by_name["mnist1d_mlp"]["options"] == ["activation", "depth", "init_scale", "input_scale", "train_subset", "valid_size", "width"]
    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.strip("│").split("│")] for line in result.output.splitlines() if line.startswith("│"))}
    assert rows["svhn_wrn164 BN"][:5] == ["SVHN", "2,748,890", "128", "160", "0.0005"]
    assert rows["mnist1d_mlp"][0] == "MNIST-1D*"  # generated locally
    assert rows["two_d_beale"][:5] == ["2-D noise*", "2", "128", "10", "0"]
    assert "available: svhn_wrn164" in result.output.replace("\n", " ")
    from rich.console import Console

    from cockpit_cli.problem_table import problem_rows, render_problem_table

    for width, with_model in ((110, True), (109, False)):  # the model column needs 110 columns
        console = Console(file=io.StringIO(), width=width)
        console.print(render_problem_table(problem_rows(), width=width))
        assert ("MLP 40-100-100-10" in console.file.getvalue()) is with_model


def test_dry_run_validates_and_writes_nothing(make_config, tmp_path: Path) -> None:
    config = make_config()
    result = invoke("run", str(config), "--dry-run", "--set", "optimizer.lr=0.5")
    assert result.exit_code == 0, result.output
    assert "effective config" in result.output and "lr: 0.5" in result.output
    assert "total_steps: 12\n" in result.output and "optimizer: SGD(lr=0.5, momentum=0, " in result.output
    assert "parameters: 15,210\n" in result.output and "splits: train 6,400, train_eval " in result.output
    assert "schedule:" not in result.output.split("dry run: config is valid")[1]  # no schedule, no plan
    scheduled = invoke("run", str(config), "--dry-run", "--set", "schedule={name: StepLR, step_size: 4, gamma: 0.5, interval: step}")
    assert "        schedule: StepLR once per step: lr 0.1 at the start, 0.025 at the end (lowest 0.025, highest 0.1)" in scheduled.output
    assert not (tmp_path / "results").exists()


def test_run_writes_a_complete_run_directory(make_config, tmp_path: Path) -> None:
    config = make_config()
    result = invoke("run", str(config), "--name", "first", "--set", "training.steps=6", "--set", "output.figures=true")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "results" / "first"
    for figure in ("cockpit.png", "layers.png", "samples.png"):
        assert (run_dir / figure).stat().st_size > 10_000
    assert f"results in {run_dir}" in result.output.replace("\n", "")
    assert re.search(r"^     valid: loss \d\.\d+, accuracy 0\.\d{3}$", result.output, re.MULTILINE)
    run = read_run(run_dir)
    assert run.status == "completed"
    assert len(run.steps) == 6
    assert [e["step"] for e in run.evals] == [0, 5, 6]
    assert run.config["training"]["steps"] == 6 and run.config["output"]["name"] == "first"
    assert run.summary is not None and run.summary["steps"] == 6
    assert run.manifest["versions"]["torch"]
    # never overwritten without --overwrite
    again = invoke("run", str(config), "--name", "first")
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output
    assert read_run(run_dir).status == "completed"
    assert invoke("run", str(config), "--name", "first", "--overwrite").exit_code == 0


def test_out_option_sets_the_parent_directory(make_config, tmp_path: Path) -> None:
    result = invoke("run", str(make_config()), "--out", str(tmp_path / "elsewhere"), "--set", "training.steps=2")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "elsewhere").iterdir()
    assert run_dir.name == "run"
    assert not list(run_dir.glob("*.png"))  # output.figures: false


def test_a_run_without_a_name_records_the_name_it_was_given(make_config, tmp_path: Path) -> None:
    result = invoke("run", str(make_config()), "--set", "output.name=null", "--set", "training.steps=2")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "results").iterdir()
    assert run_dir.name.startswith("mnist1d_mlp_sgd_")
    assert read_run(run_dir).config["output"]["name"] == run_dir.name  # `--resume` and the reports read it there


def test_a_live_run_ends_with_its_summary_panel(make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cockpit_cli.runner as run_command

    monkeypatch.setattr(run_command, "use_live_display", lambda requested, console, errors: True)
    result = invoke("run", str(make_config()), "--live", "--set", "training.steps=3")
    assert result.exit_code == 0, result.output
    panel = result.output[result.output.rindex("Cockpit for SGD · mnist1d_mlp"):]
    assert "completed after 3 of 3 steps" in panel and "cockpit diagnose" in panel and "final" in panel


def test_figures_that_cannot_be_drawn_are_a_note_and_the_run_completes(make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cockpit_cli.report as report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "write_report", broken)
    result = invoke("run", str(make_config()), "--set", "training.steps=2", "--set", "output.figures=true")
    assert result.exit_code == 0, result.output
    assert "note: the figures could not be written (RuntimeError: no fonts)" in result.output
    assert read_run(tmp_path / "results" / "run").status == "completed"


def test_the_live_view_needs_a_terminal_and_is_off_in_ci_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from cockpit_cli.runner import use_live_display

    terminal, pipe, errors = Console(file=io.StringIO(), force_terminal=True), Console(file=io.StringIO()), Console(file=io.StringIO())
    monkeypatch.delenv("CI", raising=False)
    assert use_live_display(None, terminal, errors) and not use_live_display(False, terminal, errors)
    monkeypatch.setenv("CI", "true")
    assert not use_live_display(None, terminal, errors) and use_live_display(True, terminal, errors)
    assert not use_live_display(None, pipe, errors) and errors.file.getvalue() == ""
    assert not use_live_display(True, pipe, errors)
    assert errors.file.getvalue().startswith("note: --live needs a terminal")


def test_a_live_diagnosis_error_is_a_critical_alert() -> None:
    from types import SimpleNamespace

    from cockpit_cli.runner import live_diagnosis

    alerts: list[tuple[str, str, str]] = []
    observer = live_diagnosis(parse_config({}), lambda *alert: alerts.append(alert))
    for severity in ("error", "warning"):
        observer.on_alert(SimpleNamespace(severity=severity, rule="divergence", meaning="The loss grew.", hint="lower lr"))
    assert alerts == [("critical", "divergence: The loss grew. Try: lower lr", "divergence"), ("warning", "divergence: The loss grew. Try: lower lr", "divergence")]
    observer.on_clear("divergence", 40, 75)
    assert alerts[-1] == ("info", "divergence: no longer found at step 75 (raised at step 40)", "divergence")  # replaces the alert


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optimizer.lr"], "error: --set 'optimizer.lr': expected key.path=value"),
        (["--set", "problem.name=mnist1d_mpl"], "problem.name: problem 'mnist1d_mpl' is unknown; did you mean 'mnist1d_mlp'?"),
        (["--set", "optimizer.lr=-1"], "optimizer: torch.optim.SGD rejected the arguments: Invalid learning rate: -1"),
        (["--set", "training.epocs=3"], "training.epocs: unknown key; did you mean 'epochs'?"),
        (["--name", "../escape"], "output.name: '../escape' is not a safe directory name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(make_config, args: list[str], message: str) -> None:
    result = invoke("run", str(make_config()), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_config_file(tmp_path: Path) -> None:
    result = invoke("run", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file" in result.output and "does not exist" in result.output


def test_traceback_flag_re_raises(make_config) -> None:
    from cockpit_cli.errors import CockpitError

    with pytest.raises(CockpitError):
        invoke("run", str(make_config()), "--set", "problem.name=nope", "--traceback")


def test_diverged_run_exits_1_and_keeps_its_records(make_config, tmp_path: Path) -> None:
    config = make_config(optimizer={"lr": 1e6}, problem={"input_scale": 1000.0}, training={"steps": 40})
    result = invoke("run", str(config))
    assert result.exit_code == 1
    assert "error: run diverged: the loss became" in result.output
    run = read_run(tmp_path / "results" / "run")
    assert run.status == "diverged" and run.steps and run.summary["status"] == "diverged"


@pytest.mark.slow
def test_ctrl_c_leaves_a_readable_interrupted_run(tmp_path: Path, data_dir: Path) -> None:
    from conftest import tiny_config, write_config

    config = tiny_config(data_dir, tmp_path / "results", training={"steps": 100_000, "eval_every_steps": 100_000, "log_every": 1})
    path = write_config(tmp_path / "long.yaml", config)
    process = subprocess.Popen(
        [sys.executable, "-m", "cockpit_cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    steps_file = tmp_path / "results" / "run" / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not steps_file.exists() or steps_file.stat().st_size < 2000):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" not in stderr  # no checkpoint to continue from
    run = read_run(tmp_path / "results" / "run")
    assert run.status == "interrupted"
    assert len(run.steps) >= 10 and run.summary is not None
    assert run.manifest["steps_completed"] == len(run.steps)
    assert yaml.safe_load((run.path / "config.yaml").read_text())["training"]["steps"] == 100_000


@pytest.mark.slow
def test_a_run_killed_with_sigkill_stays_readable_by_every_command(tmp_path: Path, data_dir: Path) -> None:
    from conftest import tiny_config, write_config

    config = tiny_config(data_dir, tmp_path / "results", training={"steps": 100_000, "eval_every_steps": 50}, instruments={"preset": "economy", "every": 3})
    path = write_config(tmp_path / "long.yaml", config)
    process = subprocess.Popen([sys.executable, "-m", "cockpit_cli", "run", str(path), "--no-live"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "results" / "run"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not (run_dir / "steps.jsonl").exists() or (run_dir / "steps.jsonl").stat().st_size < 20_000):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    run = read_run(run_dir)
    assert run.status == "running" and run.summary is None and len(run.steps) > 5
    assert invoke("diagnose", str(run_dir)).exit_code == 0
    assert invoke("report", str(run_dir), "--out", str(tmp_path / "figures")).exit_code == 0
    assert invoke("watch", str(run_dir), "--no-follow").exit_code == 0
    other = tmp_path / "results" / "other"
    shutil.copytree(run_dir, other)
    assert invoke("compare", str(run_dir), str(other)).exit_code == 0


def test_plain_log_prints_live_diagnosis_alerts(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "failures" / "lr_too_large.yaml"
    result = invoke("run", str(config), "--no-live", "--out", str(tmp_path), "--name", "lr", "--set", "output.figures=false")
    assert result.exit_code == 0, result.output
    assert result.output.count("alert (warning) lr_too_large:") == 1  # once per episode, not every check


@pytest.mark.parametrize("training", [{"steps": 12, "eval_every_steps": 5}, {"steps": None, "epochs": 1, "eval_every_steps": None, "eval_every_epochs": 1}])
def test_the_last_step_is_logged_before_the_final_evaluation(make_config, training: dict) -> None:
    config = make_config(instruments={"preset": "economy"}, problem={"batch_size": 1000}, training=training)  # Alpha delays records by a step
    result = invoke("run", str(config), "--no-live")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    last_step = max(i for i, line in enumerate(lines) if line.startswith("step "))
    final_eval = max(i for i, line in enumerate(lines) if line.startswith("eval after step"))
    assert last_step < final_eval


@pytest.mark.parametrize("lines", [3, 60], ids=["while-starting", "while-training"])
def test_a_run_whose_output_is_closed_stops_saying_so(tmp_path: Path, data_dir: Path, lines: int) -> None:
    """``cockpit run ... | head``: the run ends quietly with exit code 1, its directory says why."""
    from conftest import tiny_config, write_config

    config = tiny_config(data_dir, tmp_path / "results", training={"steps": 5000, "eval_every_steps": 5000, "log_every": 1})
    path = write_config(tmp_path / "long.yaml", config)
    command = f"{sys.executable} -m cockpit_cli run {path} --no-live | head -{lines}; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    run = read_run(tmp_path / "results" / "run")
    assert (run.status, run.manifest["message"]) == ("failed", "its standard output was closed (the program reading it ended)")
    assert (len(run.steps) > 0) == (lines == 60) and run.summary is not None


@pytest.mark.parametrize(("error", "status", "code"), [(KeyboardInterrupt(), "interrupted", 130), (RuntimeError("no display"), "failed", 1)])
def test_a_run_stopped_before_its_first_step_does_not_read_as_running(make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, status: str, code: int) -> None:
    import cockpit_cli.runner as runner_module

    def fail(*args: object, **kwargs: object) -> bool:
        raise error

    monkeypatch.setattr(runner_module, "use_live_display", fail)  # between creating the directory and training
    result = invoke("run", str(make_config()), "--no-live")
    assert result.exit_code == code
    run = read_run(tmp_path / "results" / "run")
    expected = "interrupted by the user before training started" if status == "interrupted" else "RuntimeError: no display"
    assert (run.status, run.manifest["message"], run.steps) == (status, expected, []) and run.summary is not None
