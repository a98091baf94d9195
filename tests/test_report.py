"""``cockpit report``: the cockpit, layers and samples figures of real tiny runs, empty data, step ranges."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from pathlib import Path

import matplotlib.colors
import pytest
from conftest import tiny_config, write_config
from matplotlib.figure import Figure
from rich.console import Console
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.errors import CockpitError
from cockpit_cli.report import gauges, parse_step_range, write_report
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


def test_the_trace_panel_is_named_for_the_run_s_curvature_diagonal(runs: dict[str, RunData]) -> None:
    import dataclasses

    tracked = runs["tracked"]
    assert tracked.manifest["instruments"]["curvature"] == "hessian"
    instruments = {**tracked.manifest["instruments"], "curvature": "ggn"}
    text = texts(cockpit_figure(RunView(dataclasses.replace(tracked, manifest={**tracked.manifest, "instruments": instruments}))))
    assert "GGN trace" in text and "tr(G) (sum over parameters)" in text and "Hessian trace" not in text


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
    api = dataclasses.replace(stripped, manifest={**stripped.manifest, "problem": "custom"})  # a run of TrackedRun: no config key to turn them on
    assert "a run of the Python API records each split's loss and accuracy" in texts(samples_figure(RunView(api)))


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
    [("5:2", "must be smaller"), ("3:3", "must be smaller"), ("x:3", "'x' is not a step number"), ("3", "not of the form A:B"), ("1:2:3", "not of the form"), ("1-2-3", "not of the form"), ("-1:4", "not a step number"), (":4", "not a step number")],
)
def test_bad_step_ranges(text: str, message: str) -> None:
    with pytest.raises(CockpitError, match=message):
        parse_step_range(text)


def test_step_range_parses() -> None:
    assert parse_step_range("0:10") == (0, 10) and parse_step_range(" 100:500 ") == (100, 500)
    assert parse_step_range("640-1216") == (640, 1216)  # as `cockpit diagnose` writes a finding's steps
    with pytest.raises(CockpitError, match="not of the form A:B"):
        parse_step_range("-1-4")


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


# what the gauges draw: the numbers of a synthetic run --------------------------------------------


def synthetic_view(quantities_at: dict[int, dict]) -> RunView:
    """A view of a run whose steps record ``quantities_at[step]``."""
    steps = [{"step": step, "epoch": 0, "loss": 1.0, "lr": [0.1], "time": float(step), "quantities": quantities} for step, quantities in sorted(quantities_at.items())]
    manifest = {"schema_version": 1, "status": "completed", "problem": "toy", "optimizer": "SGD", "instruments": {"parameters": ["0.weight"]}}
    return RunView(RunData(path=Path("toy"), manifest=manifest, config={}, steps=steps, evals=[], summary=None))


def gauge_axes(draw, view: RunView) -> list:
    figure = Figure()
    draw(figure, figure.add_gridspec(1, 1)[0], view)
    return figure.axes


def test_the_gradient_histogram_says_what_share_its_edge_bins_hold() -> None:
    """Rosenbrock's 256 gradient elements lay mostly beyond the default range: the figure showed a
    red edge bin without saying it held most of them (the live view says the share)."""
    histogram = {"counts": [150, 10, 20, 6, 70], "range": [-2.0, 2.0]}
    (ax,) = gauge_axes(gauges.histogram_1d_gauge, synthetic_view({0: {"GradHist1d": histogram}}))
    assert "red: edge bins (clamped values): 85.9% of 256" in [text.get_text() for text in ax.texts]


def test_alpha_gauge_of_a_run_that_went_non_finite() -> None:
    """Two finite values then NaN: the recent window has none, which the legend says (numpy warned
    'Mean of empty slice' into the user's terminal), and the title counts the non-finite steps."""
    import warnings

    alphas = [0.1, 2.0] + [math.nan] * 22
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax, twin = gauge_axes(gauges.alpha_gauge, synthetic_view({8 * step: {"Alpha": value} for step, value in enumerate(alphas)}))
    assert ax.get_title() == "Alpha distribution (22 of 24 non-finite; 1 of 2 beyond ±1.5, in the edge bins)"
    labels = [text.get_text() for text in twin.get_legend().get_texts()]
    assert "all (median 1.05)" in labels and "last 5: none finite" in labels
    (ax,) = gauge_axes(gauges.alpha_gauge, synthetic_view({step: {"Alpha": value} for step, value in enumerate([0.1] + [math.nan] * 9)}))
    assert "Alpha: 1 finite value of 10 tracked steps for a distribution" in " ".join(text.get_text() for text in ax.texts).replace("\n", " ")


def test_alpha_gauge_counts_the_values_beyond_its_edges_and_shows_the_recent_ones() -> None:
    alphas = [0.0] * 15 + [1.0, 1.0, 5.0] + [-19.0, 1.0]  # 20 steps: a tenth is two, the recent window five
    ax, twin = gauge_axes(gauges.alpha_gauge, synthetic_view({step: {"Alpha": value} for step, value in enumerate(alphas)}))
    assert "(2 of 20 beyond ±1.5, in the edge bins)" in ax.get_title()
    labels = [text.get_text() for text in twin.get_legend().get_texts()]
    assert "all (median 0.00)" in labels and "last 5 (median 1.00)" in labels  # the last two's would be -9


def test_gradient_tests_picture_has_the_latest_values() -> None:
    view = synthetic_view({0: {"NormTest": 9.0, "InnerTest": 9.0, "OrthoTest": 9.0}, 1: {"NormTest": 0.5, "InnerTest": 0.25, "OrthoTest": 2.0}})
    axes = gauge_axes(gauges.gradient_tests_gauge, view)
    picture = next(ax for ax in axes if ax.get_title() == "Gradient tests (latest)")
    (circle,) = [patch for patch in picture.patches if patch.get_label().startswith("norm r")]
    assert circle.get_radius() == 0.5
    inner = next(patch for patch in picture.patches if patch.get_label().startswith("inner"))
    ortho = next(patch for patch in picture.patches if patch.get_label().startswith("ortho"))
    assert inner.get_label() == "inner ±0.25" and ortho.get_label() == "ortho ±2"
    assert (inner.get_y(), inner.get_height()) == (-0.25, 0.5)  # a band across, as wide as the inner-product test
    assert (ortho.get_x(), ortho.get_width()) == (-2.0, 4.0)  # a band upwards, as wide as the orthogonality test
    assert picture.get_xlim() == pytest.approx((-2.3, 2.3))  # 1.15 times the largest latest value


def test_histogram_gauge_draws_the_latest_counts_over_their_own_range() -> None:
    latest = [5, 0, 7, 1]
    view = synthetic_view({0: {"GradHist1d": {"counts": [9, 9, 9, 9], "range": [-2.0, 2.0]}}, 3: {"GradHist1d": {"counts": latest, "range": [-0.5, 0.5]}}})
    (ax,) = gauge_axes(gauges.histogram_1d_gauge, view)
    assert "(step 3)" in ax.get_title() and ax.get_xlim() == (-0.5, 0.5)
    bars = ax.patches
    assert [bar.get_height() for bar in bars] == [5, 0.8, 7, 1]  # an empty bin drawn just above the log axis' floor
    assert [bar.get_x() for bar in bars] == pytest.approx([-0.5, -0.25, 0.0, 0.25])
    red = matplotlib.colors.to_rgba("#d62728")
    assert [bar.get_facecolor() == red for bar in bars] == [True, False, False, True]  # the clamped edge bins


def test_joint_histogram_gauge_puts_parameters_across_and_gradients_up() -> None:
    counts = [[1, 2, 3], [4, 5, 6]]  # (gradient bins, parameter bins)
    view = synthetic_view({2: {"GradHist2d": {"counts": counts, "range": [[-0.1, 0.1], [-3.0, 3.0]]}}})
    axes = gauge_axes(gauges.histogram_2d_gauge, view)
    main = next(ax for ax in axes if ax.images)
    assert main.images[0].get_extent() == [-3.0, 3.0, -0.1, 0.1]
    top = next(ax for ax in axes if "(step 2)" in ax.get_title())
    assert [bar.get_height() for bar in top.patches] == [5, 7, 9]  # the parameter marginal
    side = next(ax for ax in axes if ax is not main and ax is not top)
    assert [bar.get_width() for bar in side.patches] == [6, 15]  # the gradient marginal


def test_the_tic_panel_shows_tictrace_when_only_it_was_tracked() -> None:
    only_trace = texts(cockpit_figure(synthetic_view({step: {"TICTrace": 1.0 + step} for step in range(3)})))
    assert "Takeuchi information criterion (TICTrace)" in only_trace
    both = texts(cockpit_figure(synthetic_view({step: {"TICTrace": 1.0, "TICDiag": 2.0} for step in range(3)})))
    assert "Takeuchi information criterion (TICDiag)" in both


def test_a_step_range_beyond_the_last_step_keeps_its_own_span() -> None:
    view = synthetic_view({step: {"Alpha": 0.0} for step in range(6)})
    assert RunView(view.run, (5, 8)).step_span() == (5, 8)  # not the empty 5-5
    assert RunView(view.run, (2, 8)).step_span() == (2, 5)


def test_sample_outcomes_of_shorter_evaluations_are_unknown() -> None:
    run = synthetic_view({0: {}}).run
    evals = [{"step": 0, "samples": "10"}, {"step": 5, "samples": "1101"}]
    outcomes = RunView(dataclasses.replace(run, evals=evals)).samples()
    assert outcomes.steps == [0, 5] and outcomes.rows == ["11", "01", "?0", "?1"]


def test_layer_histograms_keep_the_recorded_range() -> None:
    def histogram(low: float) -> dict:
        return {"GradHist1d": {"counts": [1, 2], "range": [low, -low], "per_parameter": [[1, 2]]}}

    steps, counts, value_range = synthetic_view({0: histogram(-0.5), 1: histogram(-0.5)}).layer_histograms()
    assert steps == [0, 1] and counts == {"0": [[1, 2], [1, 2]]} and value_range == (-0.5, 0.5)
    assert synthetic_view({0: histogram(-0.5), 1: histogram(-0.25)}).layer_histograms()[2] is None  # adaptive: the range moved


def performance_axes(figure: Figure):
    return next(ax for ax in figure.axes if ax.get_title(loc="left") == "Performance")


def test_the_performance_panel_marks_non_finite_losses_and_the_title_says_how_the_run_ended() -> None:
    def view_of(losses: list[float], status: str = "completed", message: str | None = None) -> RunView:
        run = synthetic_view({step: {} for step in range(len(losses))}).run
        for record, loss in zip(run.steps, losses):
            record["loss"] = loss
        run.manifest.update(status=status, message=message)
        return RunView(run)

    figure = cockpit_figure(view_of([2.0, 5.0, math.nan, 3e6, math.inf, 1.0], "diverged", "the loss became nan at step 2 (epoch 0); the learning rate is probably too large"))
    ax = performance_axes(figure)
    markers = [collection for collection in ax.collections if collection.get_label().startswith("non-finite loss")]
    assert [marker.get_label() for marker in markers] == ["non-finite loss (2 steps)"]
    assert sorted(markers[0].get_offsets()[:, 0]) == [2.0, 4.0]
    assert ax.get_yscale() == "log"  # 1 to 3e6: a linear axis would flatten every loss but one
    assert "diverged: the loss became nan at step 2 (epoch 0)" in texts(figure) and "too large" not in texts(figure)
    figure = cockpit_figure(view_of([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert performance_axes(figure).get_yscale() == "linear" and not any(c.get_label().startswith("non-finite") for c in performance_axes(figure).collections)
    assert "diverged" not in texts(figure) and "completed" not in texts(figure)
    assert "the loss of every step is non-finite (6 steps)" in texts(cockpit_figure(view_of([math.nan] * 6)))
    ticks = performance_axes(cockpit_figure(view_of([2.0, 1.0, 0.5]))).get_xticks()
    assert len(ticks) and all(float(tick).is_integer() for tick in ticks)  # steps, not fractions of one


def test_how_a_run_ended_reads_from_its_status_and_message() -> None:
    from cockpit_cli.report.plotting import ending

    assert ending({"status": "completed", "message": None}) is None
    assert ending({"status": "interrupted", "message": "interrupted by the user after 17 steps"}) == "interrupted by the user after 17 steps"
    assert ending({"status": "failed", "message": "OSError: disk full"}) == "failed: OSError: disk full"
    assert ending({"status": "running"}) == "running"


def test_log_scaled_panels_say_so_and_average_the_logarithms() -> None:
    def panel(name: str, values: list[float]):
        view = synthetic_view({step: {name: [value] if name == "GradNorm" else value} for step, value in enumerate(values)})  # GradNorm per parameter
        title = {"HessMaxEV": "Largest Hessian eigenvalue", "GradNorm": "Gradient norm"}[name]
        return next(ax for ax in cockpit_figure(view).axes if ax.get_title() == title)

    norms = panel("GradNorm", [350.0] + [2.0] * 12)
    average = next(line for line in norms.get_lines() if line.get_label() == "moving average").get_ydata()
    assert norms.get_yscale() == "log" and norms.get_ylabel().endswith(", log scale")
    assert average[-1] < 4  # the geometric average; the plain one would still be 26, above every later point
    curvature = panel("HessMaxEV", [-380.0, 970.0, 800.0])  # the largest eigenvalue in magnitude can be negative
    assert curvature.get_yscale() == "linear" and curvature.get_ylabel() == "λ_max"


@pytest.mark.parametrize("value", [0.2155567856502195, 2.0])
def test_a_log_panel_of_one_finite_value_has_a_height(value: float) -> None:
    """A run that diverged after its first step has one finite gradient norm: its log axis spans a
    factor of 3 each side (it had zero height, and matplotlib divided by it while drawing)."""
    import warnings

    from cockpit_cli.report.cockpit_figure import scalar_panel

    view = synthetic_view({0: {"HessMaxEV": value}, 1: {"HessMaxEV": math.nan}, 2: {"HessMaxEV": math.nan}})
    figure = Figure()
    ax = scalar_panel(figure, figure.add_gridspec(1, 1)[0], view, "HessMaxEV", "Largest Hessian eigenvalue", "λ_max")
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert value / 4 < low < value / 2.9 and value * 2.9 < high < value * 4  # and the margins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure.savefig(io.BytesIO(), format="png")


def test_the_performance_legend_sits_above_the_plot_right_of_its_title() -> None:
    """Inside the plot the legend covered the latest losses and accuracies."""
    from cockpit_cli.report.cockpit_figure import performance_panel

    run = synthetic_view({step: {} for step in range(50)}).run
    steps = [{**record, "loss": math.nan if record["step"] > 40 else 1.0} for record in run.steps]
    splits = {split: {"loss": 1.0, "accuracy": 0.5} for split in ("train_eval", "valid")}
    evals = [{"step": step, "epoch": 0, "time": 0.0, "splits": splits} for step in (0, 49)]
    view = RunView(dataclasses.replace(run, steps=steps, evals=evals))
    figure = Figure(figsize=(13, 3))  # the panel's size in the cockpit figure
    performance_panel(figure, figure.add_gridspec(1, 1)[0], view)
    ax = figure.axes[0]
    figure.canvas.draw()
    from matplotlib.text import Text

    title = next(child for child in ax.get_children() if isinstance(child, Text) and child.get_text() == "Performance").get_window_extent()
    legend, plot = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y0 >= plot.y1 - 1 and legend.x1 <= plot.x1 + 1
    assert title.x1 < legend.x0  # the title on the left, the legend beside it
    labels = ["moving average", "non-finite loss (9 steps)", "train_eval accuracy (right)", "valid accuracy (right)"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == labels


def test_the_layers_figure_of_a_run_that_went_non_finite() -> None:
    """One finite value per layer draws a visible marker (a line of one point draws nothing), the
    non-finite steps are counted, the figure says how the run ended, and each heat-map column is
    centred on its step."""
    layer_stats = [{"weight_norm": [2.0], "grad_norm": [0.5], "update_ratio": [0.1], "zero_grad_fraction": [0.0]}]
    layer_stats += [{"weight_norm": [math.nan], "grad_norm": [math.nan], "update_ratio": [math.nan], "zero_grad_fraction": [0.0]}] * 3
    histogram = [{"counts": [4, 6], "range": [-2.0, 2.0], "per_parameter": [[4, 6]]}] + [{"counts": [0, 0], "range": [-2.0, 2.0], "per_parameter": [[0, 0]]}] * 3
    view = synthetic_view({step * 10: {"LayerStats": stats, "GradHist1d": counts} for step, (stats, counts) in enumerate(zip(layer_stats, histogram))})
    view.run.manifest.update(status="diverged", message="the loss became nan at step 11 (epoch 0); the learning rate is probably too large")
    figure = layers_figure(view)
    text = texts(figure)
    assert "diverged: the loss became nan at step 11 (epoch 0)" in text and "too large" not in text
    assert "diverged: the loss became nan at step 11 (epoch 0)" in texts(samples_figure(view))
    assert text.count("non-finite at 3 of 4 tracked steps") == 2  # gradient and weight norms (the ratio needs two finite norms)
    for ax in figure.axes[:3]:
        (line,) = ax.lines
        assert line.get_marker() == "o" and list(line.get_xdata()) == [0]
    heatmap = next(ax for ax in figure.axes if ax.images)
    assert heatmap.images[0].get_extent() == [-5.0, 35.0, -2.0, 2.0]  # four columns of 10 steps around 0, 10, 20, 30


def test_a_layer_s_line_at_the_end_of_the_shared_range_stays_inside_the_frame() -> None:
    """The rows of a column share one y range; the extreme row's own range was tight around its
    line (a nearly constant weight norm of 28.9 beside norms of 2), which then ran along the frame."""
    stats = [{"weight_norm": [28.89 + 0.01 * step, 2.3 + 0.1 * step], "grad_norm": [0.1, 0.2], "update_ratio": [1e-3, 1e-2], "zero_grad_fraction": [0.0, 0.0]} for step in range(5)]
    view = synthetic_view({step: {"LayerStats": row} for step, row in enumerate(stats)})
    view.run.manifest["instruments"]["parameters"] = ["embed.weight", "out.weight"]
    figure = layers_figure(view)
    for column in range(3):
        axes = [ax for ax in figure.axes if ax.lines][column::3]
        low, high = axes[0].get_ylim()
        assert all(ax.get_ylim() == (low, high) for ax in axes)
        values = [value for ax in axes for value in ax.lines[0].get_ydata()]
        span = math.log(high) - math.log(low)
        assert math.log(min(values)) - math.log(low) >= 0.04 * span and math.log(high) - math.log(max(values)) >= 0.04 * span


def test_the_moving_average_is_centred_and_follows_a_trend_to_the_ends() -> None:
    """A trailing average of 20 tracked steps lagged hundreds of steps behind a rise; this one
    reproduces a straight line exactly (unevenly spaced, ends included) and a step at once."""
    from cockpit_cli.report.plotting import moving_average, trend_window

    assert [trend_window(count) for count in (1, 20, 200, 1280, 100_000)] == [3, 3, 9, 51, 51]
    steps = [0, 1, 3, 8, 20, 21, 40, 64, 65, 100]
    line = [2.0 - 0.5 * step for step in steps]
    assert moving_average(steps, line, 5) == pytest.approx(line)
    assert list(moving_average([0, 1], [3.0, 7.0], 5)) == [3.0, 7.0]
    rise = [0.0] + [45.0] * 19  # a top eigenvalue from its first tracked step to the second
    smoothed = moving_average([64 * index for index in range(20)], rise, 3)
    assert list(smoothed[2:]) == pytest.approx([45.0] * 18) and smoothed[1] == pytest.approx(30.0)
    drop = [357.0, 166.0, 130.0, 110.0] + [100.0] * 40  # a loss's first steps
    smoothed = moving_average(list(range(44)), drop, 29)
    assert smoothed[0] == 357.0 and smoothed[1] == pytest.approx(653 / 3) and smoothed[-1] == 100.0  # centred: no line cut across the drop
    noise = [(-1.0) ** index for index in range(400)]
    assert max(abs(value) for value in moving_average(list(range(400)), noise, 15)[10:-10]) < 0.1


def test_a_narrow_log_axis_has_ticks_told_apart() -> None:
    """Two gradient norms of 0.2155 and 0.2075 left a log axis without a single tick label."""
    from cockpit_cli.report.plotting import ReadableLogLocator, ReadableNumberFormatter

    ticks = [tick for tick in ReadableLogLocator().tick_values(0.2070, 0.2160) if 0.2070 <= tick <= 0.2160]
    assert len(ticks) >= 2
    assert ReadableNumberFormatter().format_ticks([0.2075, 0.21, 0.2125, 0.215]) == ["0.2075", "0.21", "0.2125", "0.215"]
    assert ReadableNumberFormatter().format_ticks([0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 1e3]) == ["0.1", "0.2", "0.5", "1", "2", "5", "1e+03"]
    assert [tick for tick in ReadableLogLocator().tick_values(0.05, 3.0) if 0.05 <= tick <= 3.0] == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    view = synthetic_view({0: {"GradNorm": [0.2155]}, 1: {"GradNorm": [0.2075]}})
    ax = next(ax for ax in cockpit_figure(view).axes if ax.get_title() == "Gradient norm")
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    labels = [label.get_text() for label, tick in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= tick <= high]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)


def test_the_figure_of_a_run_that_blew_up_without_evaluations() -> None:
    """A loop of the Python API that blew up: the loss's average on its log axis is of the
    logarithms (the plain one ran above every point), the accuracy axis is bare (it showed 0-1),
    its note clears the non-finite markers, and the histogram shown is the last that counted
    anything, its title saying the later ones counted nothing."""
    from matplotlib.text import Text

    losses = [10.0**power for power in range(0, 36, 5)] + [math.nan] * 4
    empty = {"counts": [0, 0, 0], "range": [-2.0, 2.0]}
    quantities = {step: {"GradHist1d": {"counts": [1, 5, 2], "range": [-2.0, 2.0]} if step < 6 else empty} for step in range(len(losses))}
    run = synthetic_view(quantities).run
    view = RunView(dataclasses.replace(run, steps=[{**record, "loss": loss} for record, loss in zip(run.steps, losses)]))
    figure = cockpit_figure(view)
    ax = performance_axes(figure)
    average = next(line for line in ax.get_lines() if line.get_label() == "moving average").get_ydata()
    assert ax.get_yscale() == "log" and all(value <= 1.01 * loss for value, loss in zip(average[1:-1], losses[1:7]))  # geometric: between the points
    twin = next(other for other in figure.axes if other is not ax and other.bbox.bounds == ax.bbox.bounds)
    assert not len(twin.get_yticks()) and twin.get_ylabel() == ""
    note = next(text for text in ax.texts if text.get_text() == "no accuracies evaluated")
    assert note.get_position()[1] < 0.9
    titles = [child.get_text() for axes in figure.axes for child in axes.get_children() if isinstance(child, Text)]
    assert "Gradient element histogram (step 5; the 6 tracked later counted nothing: non-finite)" in titles
