"""``cockpit report``: the cockpit, layers and samples figures of real tiny runs, empty data, step ranges."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from matplotlib.figure import Figure
from rich.console import Console
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.errors import CockpitError
from cockpit_cli.report import parse_step_range, write_report
from cockpit_cli.report.cockpit_figure import cockpit_figure
from cockpit_cli.report.command import run_report
from cockpit_cli.report.data import RunView, SampleOutcomes
from cockpit_cli.storage.totals import quantity_total as total
from cockpit_cli.report.layers_figure import layers_figure
from cockpit_cli.report.samples_figure import history, samples_figure, sort_samples
from cockpit_cli.storage.reader import RunData, read_run

runner = CliRunner()
INSTRUMENTS = {"preset": "business", "every": 2, "quantities": {"GradHist2d": True, "HessMaxEV": {"every": 4, "max_iterations": 5}}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, RunData]:
    """``tracked``: every quantity of the figure; ``plain``: preset none and no tracked samples."""
    root = tmp_path_factory.mktemp("report")
    settings = {"tracked": {"instruments": INSTRUMENTS}, "plain": {"training": {"track_samples": 0}}}
    for name, sections in settings.items():
        config = write_config(root / f"{name}.yaml", tiny_config(data_dir, root / "results", output={"name": name}, **sections))
        result = runner.invoke(app, ["run", str(config), "--no-live"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return {name: read_run(root / "results" / name) for name in settings}


def texts(figure: Figure) -> str:
    """Every title and text drawn in ``figure``, one per line."""
    parts = [text.get_text() for text in figure.texts]
    for ax in figure.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + [text.get_text() for text in ax.texts]
    return "\n".join(part for part in parts if part)


def test_report_writes_three_readable_figures(runs: dict[str, RunData], tmp_path: Path) -> None:
    paths = write_report(runs["tracked"], tmp_path / "figures", None)
    assert [path.name for path in paths] == ["cockpit.png", "layers.png", "samples.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 30_000


def test_every_cockpit_panel_has_data_when_tracked(runs: dict[str, RunData]) -> None:
    text = texts(cockpit_figure(RunView(runs["tracked"])))
    assert "Cockpit for SGD" in text
    for title in ("STEP SIZE", "GRADIENTS", "CURVATURE", "HYPERPARAMETERS", "PERFORMANCE", "Alpha distribution", "Gradient tests (latest)", "Largest Hessian eigenvalue", "Hessian trace", "TICDiag"):
        assert title in text
    assert "Gradient element histogram (step" in text and "Gradient / parameter histogram (step" in text
    assert "not tracked" not in text and "no data" not in text


def test_layers_figure_has_a_row_per_layer(runs: dict[str, RunData]) -> None:
    view = RunView(runs["tracked"])
    figure = layers_figure(view)
    layers = list(view.layer_stats())
    assert len(layers) >= 2 and all(f"layer {layer}" in texts(figure) for layer in layers)
    assert sum(1 for ax in figure.axes if ax.images) == len(layers)  # one gradient-histogram heat map per layer
    assert "not tracked" not in texts(figure)
    for stats in view.layer_stats().values():
        assert all(len(series) for series in stats.values())


@pytest.mark.parametrize("with_update_size", [True, False])
def test_layer_update_ratio_of_a_layer_with_a_parameter_at_zero(with_update_size: bool) -> None:
    """A bias at zero has an infinite ratio: the layer's update comes from UpdateSize, or is left out."""
    steps = []
    for step, (weights, ratios, sizes) in enumerate([([2.0, 0.0], [0.1, math.inf], [0.2, 0.3]), ([2.0, 0.3], [0.1, 1.0], [0.2, 0.3])]):
        quantities = {"LayerStats": {"weight_norm": weights, "grad_norm": [1.0, 1.0], "update_ratio": ratios, "zero_grad_fraction": [0.0, 0.0]}}
        if with_update_size:
            quantities["UpdateSize"] = sizes
        steps.append({"step": step, "epoch": 0, "loss": 1.0, "lr": [0.1], "time": float(step), "quantities": quantities})
    manifest = {"schema_version": 1, "status": "completed", "problem": "toy", "optimizer": "SGD", "instruments": {"parameters": ["0.weight", "0.bias"]}}
    ratio = RunView(RunData(path=Path("toy"), manifest=manifest, config={}, steps=steps, evals=[], summary=None)).layer_stats()["0"]["update_ratio"]
    expected_steps = [0, 1] if with_update_size else [1]
    assert list(ratio.steps) == expected_steps
    assert list(ratio.values) == pytest.approx([math.sqrt(0.2**2 + 0.3**2) / math.sqrt(4.0 + w * w) for w in (0.0, 0.3)][-len(expected_steps):])


def test_samples_figure_shows_the_tracked_samples(runs: dict[str, RunData]) -> None:
    figure = samples_figure(RunView(runs["tracked"]))
    text = texts(figure)
    assert "Outcome per sample and evaluation" in text and "learned" in text
    assert any(ax.images for ax in figure.axes)


def test_empty_data_says_what_to_enable(runs: dict[str, RunData], tmp_path: Path) -> None:
    view = RunView(runs["plain"])
    cockpit = texts(cockpit_figure(view))
    for message in ("Alpha not tracked: use preset economy", "HessMaxEV not tracked: use preset full", "HessTrace not tracked: use preset business", "GradHist2d not tracked"):
        assert message in cockpit.replace("\n", " ")
    assert "mini-batch loss" in cockpit  # performance has data without instruments
    assert "LayerStats not tracked" in texts(layers_figure(view)).replace("\n", " ")
    assert "no per-sample outcomes recorded" in texts(samples_figure(view))
    assert all(path.stat().st_size > 10_000 for path in write_report(runs["plain"], tmp_path, None))


def test_evaluations_without_samples(runs: dict[str, RunData]) -> None:
    run = runs["tracked"]
    stripped = dataclasses.replace(run, evals=[{**record, "samples": None} for record in run.evals])
    assert "no per-sample outcomes recorded" in texts(samples_figure(RunView(stripped)))


def test_step_range_zooms_every_figure(runs: dict[str, RunData], tmp_path: Path) -> None:
    view = RunView(runs["tracked"], (4, 8))
    figure = cockpit_figure(view)
    text = texts(figure)
    assert "steps 4-8" in text and "(step 8)" in text
    grad_norm = next(ax for ax in figure.axes if ax.get_title() == "Gradient norm")
    low, high = grad_norm.get_xlim()
    assert 3.5 < low < 4 and 8 < high < 8.5
    assert all(4 <= step <= 8 for step in view.quantity("Alpha").steps)
    assert view.samples().steps == [5]
    console = Console(file=io.StringIO(), width=200)
    assert run_report(runs["tracked"].path, tmp_path, "4:8", console) == 0
    assert "(steps 4:8)" in console.file.getvalue() and (tmp_path / "samples.png").exists()
    with pytest.raises(CockpitError, match="outside the run's steps"):
        write_report(runs["tracked"], tmp_path, (500, 900))


@pytest.mark.parametrize(
    ("text", "message"),
    [("5:2", "must be smaller"), ("3:3", "must be smaller"), ("x:3", "'x' is not a step number"), ("3", "not of the form A:B"), ("1:2:3", "not of the form"), ("-1:4", "not a step number"), (":4", "not a step number")],
)
def test_bad_step_ranges(text: str, message: str) -> None:
    with pytest.raises(CockpitError, match=message):
        parse_step_range(text)


def test_step_range_parses() -> None:
    assert parse_step_range("0:10") == (0, 10) and parse_step_range(" 100:500 ") == (100, 500)


def test_sample_histories_are_sorted_by_when_learned() -> None:
    assert history(0, "0011").learned_at == 2 and history(0, "0011").group == "learned"
    forgotten = history(1, "0110")
    assert forgotten.group == "forgotten by the end" and forgotten.forgettings == 1 and forgotten.learned_at is None
    assert history(2, "0000").group == "never learned"
    assert history(3, "1?01").forgettings == 1 and history(3, "1?01").learned_at == 3
    outcomes = SampleOutcomes([0, 1, 2, 3], ["0000", "0011", "1111", "0110"])
    assert [h.index for h in sort_samples(outcomes)] == [2, 1, 3, 0]


def test_per_parameter_totals() -> None:
    assert total("HessTrace", [1.0, 2.0]) == 3.0
    assert total("GradNorm", [3.0, 4.0]) == 5.0
    assert total("Alpha", 0.5) == 0.5 and total("Alpha", None) is None


@pytest.mark.skipif("report" not in {command.name or command.callback.__name__ for command in app.registered_commands}, reason="report is not a command of the CLI yet")
def test_cli_report(runs: dict[str, RunData], tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(runs["tracked"].path), "--out", str(tmp_path), "--step-range", "2:10"], catch_exceptions=False)
    assert result.exit_code == 0 and (tmp_path / "cockpit.png").exists()
    result = runner.invoke(app, ["report", str(runs["tracked"].path), "--step-range", "5:2"])
    assert result.exit_code == 2 and "must be smaller" in result.output


def test_report_says_what_reading_the_run_worked_around(runs: dict[str, RunData], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(runs["tracked"].path, run_dir)
    with open(run_dir / "steps.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 99, "lo')
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "figures")], catch_exceptions=False)
    assert result.exit_code == 0 and (tmp_path / "figures" / "cockpit.png").exists()
    assert result.output.startswith("note: steps.jsonl: the last line")
