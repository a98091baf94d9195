"""``cockpit compare`` on real tiny runs: text, JSON, different problems, path expansion, errors, plot."""

from __future__ import annotations

import io
import json
import shutil
import math
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from rich.console import Console
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.compare import compare_loaded, compare_runs, config_differences, load_runs
from cockpit_cli.compare_render import comparison_to_dict, format_value, render_text, run_compare
from cockpit_cli.errors import CockpitError
from cockpit_cli.storage.reader import RunData, read_run

runner = CliRunner()
ECONOMY = {"preset": "economy", "every": 2}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Three runs in one directory: ``a`` and ``b`` (two learning rates), ``c`` (another problem, no instruments)."""
    root = tmp_path_factory.mktemp("compare")
    out = root / "results"
    runs = {
        "a": {"instruments": ECONOMY},
        "b": {"instruments": ECONOMY, "optimizer": {"lr": 0.5}},
        "c": {"problem": {"name": "mnist1d_cnn"}, "training": {"steps": 6}},
    }
    for name, sections in runs.items():
        config = write_config(root / f"{name}.yaml", tiny_config(data_dir, out, output={"name": name}, **sections))
        result = runner.invoke(app, ["run", str(config), "--no-live"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return out


def text_of(paths: list[Path], metrics: tuple[str, ...] = (), plot: Path | None = None, **options) -> str:
    console = Console(file=io.StringIO(), width=140)
    assert run_compare(paths, list(metrics), as_json=False, plot=plot, console=console, **options) == 0
    return console.file.getvalue()


def test_text_shows_differences_outcome_instruments_and_the_better_run(results: Path) -> None:
    text = text_of([results / "a", results / "b"], findings=lambda run: [{"rule": "demo_rule", "severity": "warning", "meaning": f"seen in {run.name}"}])
    assert "Comparing 2 runs" in text
    assert "optimizer.lr" in text and "0.5" in text
    assert text.count("output.name") == 1  # only in the heading that says it is ignored
    for label in ("valid accuracy (best)", "test loss (final)", "wall time", "status", "Alpha median (last 10%, at least 5)", "gradient norm (final)", "NormTest median"):
        assert label in text
    assert "HessMaxEV" not in text  # not tracked by either run: no row
    assert "[warning] demo_rule: seen in b" in text
    assert "Better:" in text and "valid accuracy" in text


def test_json_is_versioned_and_names_the_winner(results: Path) -> None:
    console = Console(file=io.StringIO(), width=200)
    run_compare([results / "a", results / "b"], ["valid.loss"], as_json=True, plot=None, console=console)
    data = json.loads(console.file.getvalue())
    assert data["schema_version"] == 1
    assert [run["name"] for run in data["runs"]] == ["a", "b"]
    assert data["config_differences"] == [{"key": "optimizer.lr", "values": [0.1, 0.5]}]
    keys = {row["key"]: row for row in data["outcomes"]}
    assert keys["valid.loss.best"]["better"] == "lower" and len(keys["valid.loss.best"]["values"]) == 2
    ranking = data["ranking"]
    assert ranking["metric"] == "valid.loss"
    best = min(value for value in ranking["values"])
    assert ranking["winner"] == data["runs"][ranking["values"].index(best)]["name"]
    assert data["findings"] is None


def test_different_problems_and_nothing_in_common_are_noted(results: Path) -> None:
    comparison = compare_runs([results / "a", results / "c"], [])
    assert "problem.name" in comparison.config_differences
    assert any("different problems" in note for note in comparison.notes)
    assert any("no instrument quantity in common" in note for note in comparison.notes)
    alpha = next(row for row in comparison.instruments if row.key == "Alpha.median_last_10pct")
    assert alpha.values[0] is not None and alpha.values[1] is None
    assert format_value(alpha.values[1], alpha.kind) == "-"


def test_the_recent_alpha_median_takes_at_least_five_values() -> None:
    from cockpit_cli.compare import INSTRUMENT_ROWS
    from cockpit_cli.diagnosis.windows import Series

    recent_median = next(row[3] for row in INSTRUMENT_ROWS if row[0] == "Alpha.median_last_10pct")
    assert recent_median(Series(list(range(20)), [1.0] * 18 + [-19.0, 1.0])) == 1.0  # the last two's median is -9
    assert recent_median(Series(list(range(100)), [0.0] * 90 + [1.0] * 10)) == 1.0  # the last tenth


def test_parent_directory_and_glob_expand_to_all_runs(results: Path) -> None:
    assert [run.name for run in load_runs([results])[0]] == ["a", "b", "c"]
    assert [run.name for run in load_runs([str(results / "[ab]"), results / "a"])[0]] == ["a", "b"]  # each run once
    comparison = compare_runs([results], [])
    assert [run["name"] for run in comparison.runs] == ["a", "b", "c"]
    assert "Comparing 3 runs" in text_of([results])


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["missing", "a"], "does not exist"),
        (["a"], "at least two runs"),
        (["a", "a"], "at least two runs"),
        (["empty"], "holds none"),
        (["x*"], "matches no run directory"),
    ],
)
def test_bad_paths_are_one_line_errors(results: Path, paths: list[str], message: str) -> None:
    (results.parent / "empty").mkdir(exist_ok=True)
    base = {"missing": results / "missing", "empty": results.parent / "empty", "x*": str(results / "x*")}
    with pytest.raises(CockpitError, match=message) as error:
        compare_runs([base.get(item, results / item) for item in paths], [])
    assert "\n" not in error.value.message


def test_unknown_metrics_are_errors_with_a_suggestion(results: Path) -> None:
    with pytest.raises(CockpitError, match="did you mean 'NormTest'"):
        compare_runs([results / "a", results / "b"], ["NormTets"])
    with pytest.raises(CockpitError, match="not an evaluation metric"):
        compare_runs([results / "a", results / "b"], ["valid.acc"])
    with pytest.raises(CockpitError, match="not a scalar quantity"):
        compare_runs([results / "a", results / "b"], ["GradHist1d"])


def test_plot_is_written_with_extra_metrics(results: Path, tmp_path: Path) -> None:
    plot = tmp_path / "compare.png"
    text = text_of([results / "a", results / "b", results / "c"], ("NormTest", "valid.loss"), plot=plot)
    assert plot.exists() and plot.stat().st_size > 20_000
    assert "plot written to" in text


def test_config_differences_ignore_the_name_and_mark_unset_keys(results: Path) -> None:
    a, c = read_run(results / "a"), read_run(results / "c")
    c.config["problem"]["extra"] = 1
    differences = config_differences([a, c])
    assert "output.name" not in differences
    assert differences["problem.extra"] == ["(unset)", 1]


def test_a_run_of_the_python_api_shows_the_batch_size_its_manifest_learnt(results: Path) -> None:
    a, c = read_run(results / "a"), read_run(results / "c")
    c.manifest.update(problem="custom", batch_size=128)
    c.config["problem"] = {"name": "custom"}
    assert config_differences([a, c])["problem.batch_size"] == [a.config["problem"]["batch_size"], 128]


def test_an_empty_section_differs_from_settings_in_those_settings_alone(results: Path) -> None:
    a, c = read_run(results / "a"), read_run(results / "c")
    a.config["instruments"]["quantities"] = {}
    c.config["instruments"]["quantities"] = {"HessMaxEV": {"every": 32}}
    differences = config_differences([a, c])
    assert differences["instruments.quantities.HessMaxEV.every"] == ["(unset)", 32]
    assert "instruments.quantities" not in differences


def test_render_text_of_identical_configs_says_so(results: Path) -> None:
    comparison = compare_runs([results / "a", results / "b"], [])
    comparison.config_differences.clear()
    console = Console(file=io.StringIO(), width=120)
    console.print(render_text(comparison))
    assert "Config differences: none" in console.file.getvalue()


@pytest.mark.skipif("compare" not in {command.name or command.callback.__name__ for command in app.registered_commands}, reason="compare is not a command of the CLI yet")
def test_cli_compare(results: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(results / "a"), str(results / "b"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.output)["schema_version"] == 1
    result = runner.invoke(app, ["compare", str(results / "a")])
    assert result.exit_code == 2 and "at least two runs" in result.output


def synthetic_run(name: str, losses: list[float], accuracies: list[float] | None = None, status: str = "completed") -> RunData:
    """A run directory's data with validation evaluations only (``accuracies``: none if ``None``)."""
    evals = []
    for index, loss in enumerate(losses):
        valid = {"loss": loss} if accuracies is None else {"loss": loss, "accuracy": accuracies[index]}
        evals.append({"step": 10 * index, "epoch": index, "time": float(index), "splits": {"valid": valid}})
    manifest = {"schema_version": 1, "status": status, "problem": "mnist1d_mlp", "optimizer": "SGD"}
    return RunData(path=Path(name), manifest=manifest, config={"optimizer": {"lr": 0.1}}, steps=[], evals=evals, summary=None)


def test_ranking_takes_the_highest_accuracy_and_the_lowest_loss() -> None:
    """Each run's best value over its evaluations: the largest accuracy, the smallest loss."""
    runs = [
        synthetic_run("early", [1.0, 0.4, 0.9], [0.5, 0.8, 0.6]),  # best loss 0.4, best accuracy 0.8
        synthetic_run("late", [1.0, 0.7, 0.5], [0.5, 0.7, 0.75]),
    ]
    by_accuracy = compare_loaded(runs).ranking
    assert (by_accuracy.metric, by_accuracy.values, by_accuracy.winner) == ("valid.accuracy", [0.8, 0.75], 0)
    by_loss = compare_loaded(runs, ["valid.loss"]).ranking
    assert (by_loss.metric, by_loss.values, by_loss.winner) == ("valid.loss", [0.4, 0.5], 0)
    runs = [synthetic_run("late", [1.0, 0.7, 0.5]), synthetic_run("early", [1.0, 0.4, 0.9])]  # no accuracy: the loss
    assert compare_loaded(runs).ranking.winner == 1


def test_notes_name_ties_a_single_ranked_run_and_unfinished_runs() -> None:
    notes = compare_loaded([synthetic_run("one", [1.0, 0.5], [0.5, 0.7]), synthetic_run("two", [1.0, 0.6], [0.6, 0.7])]).notes
    assert notes == ["two tie with one on valid.accuracy"]
    comparison = compare_loaded([synthetic_run("one", [1.0, 0.5]), synthetic_run("two", [], status="interrupted")])
    assert comparison.ranking.winner is None
    assert comparison.notes == ["only one run has valid.loss: no run can be called better on it", "two is interrupted: its numbers are those recorded so far"]


def test_values_are_formatted_by_kind() -> None:
    assert [format_value(0.8125, "percent"), format_value(12.34, "seconds"), format_value([2.0, 0.0004], "trend")] == ["81.25%", "12.3 s", "2 → 4.000e-04"]
    assert [format_value(0.0073219, "seconds"), format_value(0.962, "seconds"), format_value(1.0, "seconds")] == ["7.32 ms", "962 ms", "1.0 s"]
    assert [format_value(123456, "integer"), format_value(123456.0, "number"), format_value(0.0001234, "number"), format_value(0.5, "number")] == ["123456", "1.235e+05", "1.234e-04", "0.5"]
    assert [format_value(None, "number"), format_value(math.nan, "percent"), format_value(0, "number")] == ["-", "nan", "0"]
    assert [format_value(math.inf, "number"), format_value(-math.inf, "seconds")] == ["inf", "-inf"]


def render(comparison) -> str:
    console = Console(file=io.StringIO(), width=160)
    console.print(render_text(comparison))
    return console.file.getvalue()


def cells(lines: list[str], label: str) -> list[str]:
    """The cells of the table row that starts with ``label``, after the label."""
    row = next(line for line in lines if line.startswith(label))
    return [cell.strip() for cell in row[len(label):].split("│") if cell.strip()]


def test_the_text_stars_each_rows_best_run_and_says_why_one_is_better() -> None:
    runs = [synthetic_run("early", [1.0, 0.4, 0.9], [0.5, 0.8, 0.6]), synthetic_run("late", [1.0, 0.7, 0.5], [0.5, 0.7, 0.75]), synthetic_run("flat", [1.0, 0.45, 0.45], [0.5, 0.7, 0.7])]
    lines = render(compare_loaded(runs)).splitlines()
    assert cells(lines, "valid accuracy (best)") == ["80.00% *", "75.00%", "70.00%"]  # the highest accuracy
    assert cells(lines, "valid loss (best)") == ["0.4 *", "0.5", "0.45"]  # the lowest loss
    verdict = next(line for line in lines if line.startswith("Better:"))
    assert verdict == "Better: early on valid accuracy, highest over the evaluations (early 80.00%, late 75.00%, flat 70.00%)"
    lines = render(compare_loaded(runs, ["valid.loss"])).splitlines()
    assert next(line for line in lines if line.startswith("Better:")).endswith("lowest over the evaluations (early 0.4, late 0.5, flat 0.45)")


def test_the_fastest_run_is_the_one_with_the_shortest_steps_not_the_shortest_run() -> None:
    runs = [synthetic_run("long", [1.0, 0.5]), synthetic_run("short", [1.0], status="diverged"), synthetic_run("none", [1.0]), synthetic_run("zero", [1.0], status="interrupted")]
    for run, (seconds, steps) in zip(runs, ((60.0, 600), (3.0, 3), (None, 5), (2.0, 0))):
        run.manifest.update(steps_completed=steps, timings={"train_seconds": seconds})
    lines = render(compare_loaded(runs)).splitlines()
    assert cells(lines, "wall time") == ["60.0 s", "3.0 s", "-", "2.0 s"]  # no star: the runs took different numbers of steps
    assert cells(lines, "time per step") == ["100 ms *", "1.0 s", "-", "-"]  # none for a run stopped before its first step


def test_a_row_where_every_run_is_equal_has_no_star_and_notes_are_listed() -> None:
    text = render(compare_loaded([synthetic_run("one", [1.0, 0.5], [0.5, 0.7]), synthetic_run("two", [1.0, 0.6], [0.6, 0.7])]))
    assert cells(text.splitlines(), "valid accuracy (best)") == ["70.00%", "70.00%"]
    assert "Notes" in text and "  - two tie with one on valid.accuracy" in text


def test_json_has_no_nan_and_marks_unset_config_keys_as_null() -> None:
    runs = [synthetic_run("one", [1.0, math.nan]), synthetic_run("two", [1.0, 0.5])]
    runs[1].config["optimizer"]["momentum"] = 0.9
    data = comparison_to_dict(compare_loaded(runs, ["valid.loss"]))
    assert {"key": "optimizer.momentum", "values": [None, 0.9]} in data["config_differences"]
    json.dumps(data, allow_nan=False)  # no NaN in the document


def test_an_unreadable_run_found_in_a_directory_is_left_out_with_a_note(results: Path, tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    shutil.copytree(results, folder)
    (folder / "b" / "run.json").write_text("{")
    comparison = compare_runs([folder], [])
    assert [run["name"] for run in comparison.runs] == ["a", "c"]
    assert comparison.notes[0] == f"left out a run that cannot be read: {folder / 'b' / 'run.json'} is corrupted: its manifest is not valid JSON"
    assert "left out a run that cannot be read" in text_of([str(folder / "[ab]"), folder / "c"])
    with pytest.raises(CockpitError, match="is corrupted"):  # named itself, it is an error
        compare_runs([folder / "a", folder / "b"], [])
    with pytest.raises(CockpitError) as error:
        compare_runs([str(folder / "[ab]")], [])
    assert error.value.message.startswith(f"compare needs at least two runs: only {folder / 'a'} (1 more cannot be read: left out a run")


def test_the_alpha_panel_of_the_plot_follows_a_moving_median_that_wild_values_do_not_carry() -> None:
    from cockpit_cli.report.compare_figure import compare_figure
    from cockpit_cli.report.plotting import moving_median

    assert list(moving_median([1.0, 9.0, 2.0, 3.0, 100.0, 4.0], 3)) == [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]  # centred; three at the ends too
    assert moving_median([0.1] * 19 + [-1.0], 9)[-1] == pytest.approx(0.1)  # a wild last value is not the last median
    assert list(moving_median([0.0] * 5 + [1.0] * 5, 5)) == [0.0] * 5 + [1.0] * 5  # a step change is not trailed
    alphas = [0.1 * (step % 5) for step in range(60)]
    alphas[30] = 1e6  # one wild step
    runs = [synthetic_run("steady", [1.0, 0.5]), synthetic_run("short", [1.0])]
    runs[0].steps.extend({"step": step, "loss": 1.0, "quantities": {"Alpha": value}} for step, value in enumerate(alphas))
    runs[1].steps.append({"step": 0, "loss": 1.0, "quantities": {"Alpha": 1e11}})  # a diverged run's only value
    ax = next(ax for ax in compare_figure(runs).axes if ax.get_title() == "Alpha")
    line = next(line for line in ax.get_lines() if line.get_label() == "steady")
    assert max(line.get_ydata()) <= 0.4  # the wild step moves no median of nine
    low, high = ax.get_ylim()
    assert -0.2 < low < 0 and 0.4 < high < 1.0  # the steady run fills the panel; the wild values fall outside


def test_the_plot_legend_says_how_a_run_that_did_not_complete_ended() -> None:
    """A run that diverged after a few steps lies off every panel's scale; the legend says why."""
    from cockpit_cli.report.compare_figure import compare_figure

    runs = [synthetic_run("steady", [1.0, 0.5]), synthetic_run("blown", [1.0], status="diverged")]
    runs[1].manifest["steps_completed"] = 4
    labels = [text.get_text() for text in compare_figure(runs).legends[0].get_texts()]
    assert labels == ["steady", "blown (diverged after 4 steps)"]


def test_a_tracked_value_that_ended_non_finite_reads_nan_not_missing() -> None:
    """`-` says a run did not track a value; a diverged run's last gradient norm was tracked and is NaN."""
    runs = [synthetic_run("steady", [1.0, 0.5]), synthetic_run("blown", [1.0, math.nan])]
    for run, last in zip(runs, (0.5, math.nan)):
        run.steps.extend({"step": step, "loss": 1.0, "quantities": {"GradNorm": [value], "Alpha": 0.1}} for step, value in enumerate([1.0, last]))
    comparison = compare_loaded(runs, [])
    rows = {row.key: row for row in comparison.outcomes + comparison.instruments}
    assert [format_value(value, row.kind) for row in (rows["grad_norm.final"], rows["valid.loss.final"]) for value in row.values] == ["0.5", "nan", "0.5", "nan"]
    exported = {row["key"]: row["values"] for row in comparison_to_dict(comparison)["instruments"]}
    assert exported["grad_norm.final"] == [0.5, None]  # JSON has no NaN


def test_runs_that_diverged_at_once_do_not_set_the_alpha_panel_range() -> None:
    """Two runs with one Alpha each (41: they blew up after their first step) beside one of 20
    tracked steps: the range is the long run's, where their two values made it 0 to 45."""
    from cockpit_cli.report.compare_figure import compare_figure

    runs = [synthetic_run("steady", [1.0, 0.5]), synthetic_run("blown", [1.0]), synthetic_run("blown too", [1.0])]
    runs[0].steps.extend({"step": 64 * step, "loss": 1.0, "quantities": {"Alpha": 0.1 * (step % 5)}} for step in range(20))
    for run in runs[1:]:
        run.steps.append({"step": 0, "loss": 1.0, "quantities": {"Alpha": 41.3}})
    ax = next(ax for ax in compare_figure(runs).axes if ax.get_title() == "Alpha")
    low, high = ax.get_ylim()
    assert -0.2 < low < 0 and 0.4 < high < 1.0
    runs = [synthetic_run("blown", [1.0]), synthetic_run("blown too", [1.0])]  # only such runs: they set it
    for run, value in zip(runs, (41.3, 20.0)):
        run.steps.append({"step": 0, "loss": 1.0, "quantities": {"Alpha": value}})
    low, high = next(ax for ax in compare_figure(runs).axes if ax.get_title() == "Alpha").get_ylim()
    assert low < 20.0 and 41.3 < high


def test_the_plot_names_many_long_runs_in_legend_rows_of_their_own() -> None:
    """Nine runs with long names: the title counts them, the legend wraps into rows below it,
    and neither reaches into the panels (the names ran into the title and off the figure)."""
    from cockpit_cli.report.compare_figure import compare_figure

    runs = [synthetic_run(f"a_run_with_a_rather_long_name_{index}", [1.0, 0.5]) for index in range(9)]
    figure = compare_figure(runs)
    figure.canvas.draw()
    assert figure.get_suptitle() == "Comparison of 9 runs"
    legend = figure.legends[0].get_window_extent()
    assert legend.x1 <= figure.bbox.width
    panel_tops = [ax.get_window_extent().y1 + 20 for ax in figure.axes]  # the panels' titles sit above them
    assert legend.y0 > max(panel_tops)
    assert compare_figure(runs[:2]).get_suptitle() == f"Comparison of {runs[0].name}, {runs[1].name}"


def test_the_gradient_norm_panel_averages_the_logarithms() -> None:
    """On the log axis a line fitted to the values could end below zero (it plunged off the panel)."""
    from cockpit_cli.report.compare_figure import compare_figure

    runs = [synthetic_run("falling", [1.0, 0.5]), synthetic_run("other", [1.0, 0.5])]
    for run in runs:
        run.steps.extend({"step": step, "loss": 1.0, "quantities": {"GradNorm": [value]}} for step, value in enumerate([1.0] * 8 + [0.01, 0.01]))
    ax = next(ax for ax in compare_figure(runs).axes if ax.get_title() == "Gradient norm")
    assert all(value > 0 for value in ax.get_lines()[0].get_ydata())


def test_runs_past_the_tenth_colour_get_another_line_style() -> None:
    from cockpit_cli.report.compare_figure import compare_figure

    runs = [synthetic_run(f"r{index}", [1.0, 0.5], [0.5, 0.6]) for index in range(12)]
    figure = compare_figure(runs)
    lines = {line.get_label(): line for line in figure.legends[0].get_lines()}
    assert lines["r0"].get_color() == lines["r10"].get_color() and lines["r0"].get_linestyle() != lines["r10"].get_linestyle()
    accuracy = next(ax for ax in figure.axes if ax.get_title() == "Valid accuracy")
    styles = {line.get_label(): line.get_linestyle() for line in accuracy.get_lines()}
    assert styles["r9"] == "-" and styles["r11"] == "--"
