"""Dashboard panels as pure functions of hand-made states, rendered on fixed-width consoles."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import pytest
from rich.console import Console, RenderableType

from cockpit_cli.display import panels
from cockpit_cli.display.dashboard import LiveDashboard
from cockpit_cli.display.layout import DashboardView
from cockpit_cli.display.plain import PlainLog
from cockpit_cli.display.panels.common import ACT, GOOD, WATCH
from cockpit_cli.display.panels.layers import grad_style, ratio_style
from cockpit_cli.display.sparkline import COARSE, Series, scale, spark
from cockpit_cli.display.state import DashboardState, RunInfo
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, RunStatus, SplitMetrics, StepRecord

PARAMETERS = ["0.weight", "0.bias", "2.weight", "2.bias", "bad.weight"]
ECONOMY = ["Alpha", "Distance", "GradHist1d", "GradNorm", "InnerTest", "Loss", "NormTest", "OrthoTest", "UpdateSize", "LayerStats", "Activations", "InputStats"]


def quantities(step: int, alpha: float, grad_scale: float = 1.0, curvature: bool = False) -> dict[str, Any]:
    """Instrument values of one step, shaped like the run directory's."""
    counts = [0] * 100
    counts[49], counts[50], counts[0], counts[99] = 500, 480, 3, 2
    values: dict[str, Any] = {
        "Alpha": alpha,
        "GradNorm": [0.3, 0.1, 0.4, 0.1, 0.2 * grad_scale],
        "Distance": [0.01 * step] * 5,
        "UpdateSize": [0.01] * 5,
        "NormTest": 0.5,
        "InnerTest": 2.0,
        "OrthoTest": 0.25,
        "GradHist1d": {"counts": counts, "range": [-2.0, 2.0], "per_parameter": []},
        "LayerStats": {
            "weight_norm": [3.0, 1.0, 2.0, 0.5, 1.0],
            "grad_norm": [0.3, 0.1, 0.4, 0.1, 0.2 * grad_scale],
            "update_ratio": [0.01, 0.01, 0.02, 0.01, 0.01],
            "zero_grad_fraction": [0.0, 0.0, 0.0, 0.0, 0.0],
        },
        "Activations": {"0": {"mean": 0.0, "std": 1.0, "zero_fraction": 0.0}, "1": {"mean": 0.1, "std": 0.4, "zero_fraction": 0.2}},
    }
    if curvature:
        values.update(HessMaxEV=30.0 + step, HessTrace=[10.0, 1.0, 5.0, 1.0, 2.0], TICDiag=4.0)
    return values


def make_state(steps: int = 40, tracked: list[str] | None = None, grad_scale: float = 1.0, curvature: bool = False, losses: list[float] | None = None) -> DashboardState:
    """A running economy-preset state with ``steps`` steps and two evaluations."""
    state = DashboardState()
    info = {"problem": "toy_mlp", "optimizer": "SGD", "device": "cpu", "total_steps": 100, "steps_per_epoch": 20, "batch_size": 32, "num_parameters": 1234}
    state.start(RunInfo.from_mapping({**info, "instruments": {"parameters": PARAMETERS, "quantities": tracked or ECONOMY}}, run_dir="results/toy"))
    state.add_eval(0, 0, 0.0, {"train_eval": {"loss": 2.3, "accuracy": 0.1}, "valid": {"loss": 2.31, "accuracy": 0.09}, "test": {"loss": 2.3, "accuracy": 0.11}})
    for step in range(steps):
        alpha = 0.5 if step < steps - steps // 10 else 0.0  # median of all 0.5, of the last 5 (4 of 0) 0
        loss = losses[step] if losses else 2.3 * 0.97**step
        state.add_step(step, step // 20, loss, [0.1], 0.05 * step, quantities(step, alpha, grad_scale, curvature))
    state.add_eval(steps, steps // 20, 2.0, {"train_eval": {"loss": 0.9, "accuracy": 0.7}, "valid": {"loss": 1.0, "accuracy": 0.66}, "test": {"loss": 1.1, "accuracy": 0.65}})
    return state


def render(renderable: RenderableType, width: int, height: int = 60, soft_wrap: bool = False) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system="truecolor", force_terminal=True, soft_wrap=soft_wrap)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("width", [100, 160])
def test_wide_dashboard_has_the_three_columns_and_the_bottom_row(width: int) -> None:
    text = render(DashboardView(make_state()), width)
    for title in ("Cockpit for SGD", "STEP SIZE", "GRADIENTS", "CURVATURE", "Alpha", "Gradient tests", "Gradient elements", "Layers", "Hyperparameters", "Performance", "Alerts"):
        assert title in text, title
    assert re.search(r"median \(all\) +0\.5 ", text) and re.search(r"median \(last 5\) +0 ", text)  # Alpha's medians
    assert "tracked with preset business" in text and "tracked with preset full" in text
    assert "step 40/100" in text and "epoch 2/5" in text
    assert "best valid" in text and "66.0%" in text
    assert "nothing to report" in text


def test_narrow_terminal_gets_the_compact_column() -> None:
    text = render(DashboardView(make_state()), 80)
    assert "STEP SIZE" not in text and "Instruments" in text
    for label in ("alpha", "grad norm", "norm test", "loss (smoothed)"):
        assert label in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_short_terminal_falls_back_to_the_compact_column() -> None:
    assert "STEP SIZE" in render(DashboardView(make_state(), fit_height=True), 160, height=60)
    assert "STEP SIZE" not in render(DashboardView(make_state(), fit_height=True), 160, height=20)


@pytest.mark.parametrize("width", [60, 100, 160])
def test_an_empty_state_renders_at_every_width(width: int) -> None:
    text = render(DashboardView(DashboardState()), width)
    assert "waiting" in text and "step 0/0" in text


def test_outlier_layer_is_highlighted_in_red() -> None:
    state = make_state(grad_scale=1000.0)  # bad.weight's gradient norm is 200 x the median
    console = Console(width=100, color_system="truecolor", force_terminal=True, file=io.StringIO())
    segments = [s for s in console.render(panels.layers(state)) if "bad.weight" in s.text]
    assert segments and segments[0].style.color.name == "red" and segments[0].style.bold
    normal = [s for s in console.render(panels.layers(state)) if "0.weight" in s.text]
    assert normal[0].style is None or normal[0].style.color is None
    assert "1 flagged" in render(panels.layers(state), 100)


def test_layer_colours_follow_the_gradient_norm_and_the_update_ratio() -> None:
    """Gradient norm against the median layer's: fine within 10x, watch within 100x, act beyond.
    Update / weight ratio: fine within [1e-5, 1e-1], watch within [1e-6, 1], act beyond."""
    assert [grad_style(value, 1.0) for value in (1.0, 0.1, 10.0, 0.05, 20.0, 0.005, 200.0, math.nan)] == [GOOD, GOOD, GOOD, WATCH, WATCH, ACT, ACT, ACT]
    assert [ratio_style(value) for value in (1e-3, 1e-5, 0.1, 5e-6, 0.5, 5e-7, 2.0)] == [GOOD, GOOD, GOOD, WATCH, WATCH, ACT, ACT]
    assert (grad_style(None, 1.0), ratio_style(None)) == ("dim", "dim")


def test_a_long_layer_table_keeps_the_flagged_rows_in_their_order() -> None:
    state = make_state()
    state.latest["LayerStats"]["update_ratio"] = [0.01, 2.0, 0.01, 5e-6, 0.01]  # 0.bias acts, 2.bias watches
    text = render(panels.layers(state, limit=2), 100)
    shown = [name for name in PARAMETERS if re.search(rf"^\W*{re.escape(name)} ", text, re.MULTILINE)]
    assert shown == ["0.bias", "2.bias"] and "3 more, 2 flagged" in text


def test_dead_activations_are_flagged() -> None:
    state = make_state()
    state.latest["Activations"] = {"0": {"zero_fraction": 0.0}, "1": {"zero_fraction": 0.95}}  # ReLU after layer 0
    text = render(panels.layers(state), 100)
    assert "95%" in text and "1 flagged" in text


def test_nan_loss_and_non_finite_quantities_raise_alerts() -> None:
    state = make_state(steps=10)
    state.add_step(10, 0, math.nan, [0.1], 1.0, {"GradNorm": [math.inf, 1.0], "Alpha": math.nan})
    text = render(panels.alerts(state), 100)
    assert "loss is nan at step 10" in text and "diverged" in text
    assert "non-finite since step 10: GradNorm inf, Alpha nan" in text
    state.finish("diverged", "the loss became nan at step 10")
    text = render(panels.alerts(state), 100)
    assert "run diverged: the loss became nan at step 10" in text
    assert "loss is nan at step 10" not in text and "GradNorm inf" in text  # the end says it, with more
    assert "✖" in render(DashboardView(state), 160)
    state = make_state(steps=10)
    state.add_step(10, 0, math.nan, [0.1], 1.0, {})
    state.finish("diverged")  # no message: the step's alert stays
    assert "loss is nan at step 10" in render(panels.alerts(state), 100)


def test_a_run_gone_non_finite_keeps_the_loss_alert_in_view() -> None:
    """After a divergence under on_nonfinite: continue every quantity and every evaluation is NaN;
    an alert for each pushed 'loss is nan: the run diverged' out of the panel's five."""
    state = make_state(steps=10)
    state.add_step(10, 0, math.nan, [0.1], 1.0, {})
    names = ["Alpha", "UpdateSize", "OrthoTest", "NormTest", "InnerTest", "GradNorm", "Distance"]
    for step in range(11, 20):
        state.add_step(step, 0, math.nan, [0.1], 1.0, {name: math.nan for name in names[: step - 10]})
        state.add_eval(step, 0, 1.0, {split: {"loss": math.nan, "accuracy": 0.1} for split in ("train_eval", "valid", "test")})
    assert [text for _, text in state.alert_list()] == [
        "train_eval loss nan, valid loss nan, test loss nan at the evaluation after step 11",
        "non-finite since step 11: Alpha nan, UpdateSize nan, OrthoTest nan, NormTest nan and 3 more",
        "loss is nan at step 10: the run diverged",
    ]
    assert "loss is nan at step 10" in render(panels.alerts(state), 100)
    assert state.snapshot().nonfinite == state.nonfinite and state.snapshot().nonfinite is not state.nonfinite


def test_the_summary_of_a_run_whose_loss_ended_non_finite_says_so() -> None:
    """Under on_nonfinite: continue the smoothed loss keeps the last finite average: the summary
    gave 'mini-batch loss 1.7e+20 (smoothed)' for a run whose last 177 losses were NaN."""
    state = make_state(steps=10)
    for step in range(10, 13):
        state.add_step(step, 0, math.nan, [0.1], 1.0, {})
    state.finish("completed", seconds=3.0)
    text = render(panels.summary(state), 120)
    assert "mini-batch loss  nan at the last step; " in text and "smoothed up to step 9" in text and "(smoothed)" not in text
    assert "(smoothed)" in render(panels.summary(make_state(steps=10)), 120)


def test_a_loss_far_above_its_start_raises_an_alert() -> None:
    state = make_state(steps=60, losses=[1.0] * 20 + [1.0 + 0.2 * i for i in range(40)])
    alerts = state.alert_list()
    assert any("loss rose far above its start" in text for _, text in alerts)
    assert "rose far above" in render(panels.alerts(state), 160)


def test_a_loss_ten_times_its_start_is_critical() -> None:
    state = make_state(steps=60, losses=[1.0] * 20 + [1.0 + 2.0 * i for i in range(40)])
    severities = {text.split(":")[0]: severity for severity, text in state.alert_list()}
    assert severities["loss rose far above its start"] == "warning" and severities["loss exploding"] == "critical"


def test_alerts_are_replaced_by_key_and_the_oldest_dropped_beyond_the_limit() -> None:
    state = DashboardState()
    state.add_alert("info", "first", key="k")
    state.add_alert("info", "other", key="o")
    state.add_alert("info", "second", key="k")  # replaces "first" and is now the newest
    assert state.alert_list() == [("info", "second"), ("info", "other")]
    for index in range(30):
        state.add_alert("info", f"note {index}")
    texts = [text for _, text in state.alert_list()]
    assert len(texts) == 20 and "note 29" in texts and "note 9" not in texts and "note 10" in texts


def test_evaluations_and_endings_raise_alerts() -> None:
    state = make_state(steps=5)
    state.add_eval(5, 0, 1.0, {"valid": {"loss": math.nan, "accuracy": 0.1}})
    assert ("critical", "valid loss nan at the evaluation after step 5") in state.alert_list()
    state.finish("interrupted", None, seconds=100.0)
    assert ("warning", "run interrupted") in state.alert_list() and state.elapsed == 100.0
    state.finish("interrupted", None, seconds=1.0)
    assert state.elapsed == 100.0  # never back


def test_a_snapshot_keeps_its_values_and_a_finished_run_its_time() -> None:
    state = make_state(steps=10)
    snapshot = state.snapshot(clock=50.0)
    counts = list(snapshot.alpha_counts)
    state.add_step(10, 0, 1.0, [0.1], 0.5, {"Alpha": 0.5})
    assert snapshot.alpha_counts == counts and snapshot.elapsed == 50.0  # a running run shows the clock
    state.finish("completed", None, seconds=3.0)
    assert state.snapshot(clock=50.0).elapsed == 3.0


def test_long_texts_wrap_inside_their_panel_on_a_soft_wrapping_console() -> None:
    state = make_state(steps=5)
    state.add_alert("warning", "a long finding that cannot fit on one line of the alerts panel at a hundred columns, ending here")
    text = render(DashboardView(state), 100, soft_wrap=True)
    assert "columns, ending" in text and "│   here" in text and max(len(line) for line in text.splitlines()) <= 100


def test_alerts_from_elsewhere_are_shown_most_severe_first() -> None:
    state = make_state(steps=5)
    state.add_alert("info", "a note")
    state.add_alert("critical", "act now")
    state.add_alert("warning", "watch this")
    assert [severity for severity, _ in state.alert_list()] == ["critical", "warning", "info"]
    with pytest.raises(ValueError):
        state.add_alert("panic", "no such severity")


def test_alerts_beyond_the_limit_are_counted() -> None:
    state = make_state(steps=5)
    for index in range(7):
        state.add_alert("warning", f"alert number {index}")
    text = render(panels.alerts(state, limit=5), 100)
    shown = [index for index in range(7) if f"alert number {index}" in text]
    assert shown == [2, 3, 4, 5, 6] and "and 2 more" in text  # the newest first


def test_log_scale_leaves_out_values_that_have_no_logarithm() -> None:
    assert scale([1.0, 10.0, 100.0, 0.0, -5.0, math.inf], log=True) == [0.0, 0.5, 1.0, None, None, None]


def test_curvature_panels_when_tracked() -> None:
    state = make_state(curvature=True, tracked=[*ECONOMY, "HessMaxEV", "HessTrace", "TICDiag"])
    text = render(DashboardView(state), 160)
    assert "tracked with preset" not in text
    assert "λmax" in text and "69" in text  # 30 + step 39
    assert "lr·λmax" in text and "6.9" in text and "unstable" in text
    assert "trace" in text and "19" in text and "TIC" in text


@pytest.mark.parametrize("curvature, title", [(None, "Hessian trace"), ("hessian", "Hessian trace"), ("ggn", "GGN trace"), ("ggn_mc", "GGN trace (Monte-Carlo)")])
def test_the_trace_is_named_for_the_run_s_curvature_diagonal(curvature: str | None, title: str) -> None:
    """None: a run directory written before the manifest named its curvature (the default's)."""
    state = make_state(curvature=True, tracked=[*ECONOMY, "HessTrace"])
    instruments = {"parameters": PARAMETERS, "quantities": [*ECONOMY, "HessTrace"], **({"curvature": curvature} if curvature else {})}
    state.info = RunInfo.from_mapping({"problem": "toy_mlp", "instruments": instruments})
    assert state.info.trace_title == title
    assert title in render(panels.hess_trace(state), 60) and title in render(panels.compact(state), 80)
    if title != "Hessian trace":
        assert "Hessian trace" not in render(DashboardView(state), 160)


def test_gradient_histogram_marks_clamped_edge_bins() -> None:
    state = make_state()
    hist = render(panels.grad_hist(state), 100)
    assert "clamped 0.51%" in hist and "◂-2" in hist and "2▸" in hist
    console = Console(width=100, color_system="truecolor", force_terminal=True, file=io.StringIO())
    clamped = [s for s in console.render(panels.grad_hist(state)) if "0.51%" in s.text]
    assert clamped[0].style.color.name == "yellow"  # over 0.1% of the elements are clamped


def test_gradient_tests_show_values_against_one() -> None:
    text = render(panels.grad_tests(make_state()), 100)
    assert "norm" in text and "0.5" in text and "inner" in text and "2" in text and "│" in text and "●" in text


def test_summary_names_the_run_directory_and_the_next_command() -> None:
    state = make_state()
    state.finish("completed", seconds=12.34)
    text = render(panels.summary(state), 100)
    assert "completed after 40 of 100 steps in 12.3 s" in text  # 0:12 said less of a quick run
    assert "results/toy" in text and "cockpit diagnose results/toy" in text
    assert "valid 1 66.0%" in text
    state.finish("completed", seconds=3723.0)
    assert "steps in 1:02:03" in render(panels.summary(state), 100)


def test_series_keeps_a_bounded_summary_of_any_length() -> None:
    series = Series()
    for step in range(100_000):
        series.append(step, float(step))
    assert len(series) == 100_000 and len(series.history()) <= 2 * COARSE + 1
    assert series.last() == 99_999.0
    copy = series.copy()
    assert len(copy.values) == 4096 and len(copy) == len(series) and copy.history() == series.history()
    assert spark([1.0, 1.0 + 1e-15, 1.0], 3) == "▅▅▅"  # flat up to rounding
    assert spark([0.0, math.nan, 1.0], 3) == "▁×█"
    assert spark([0.0, 100.0, 1.0], 3, clip=(0.0, 1.0)) == "▁██"


def test_live_dashboard_observer_without_a_terminal_prints_the_final_frame() -> None:
    stream = io.StringIO()
    dashboard = LiveDashboard(Console(file=stream, width=120), run_dir="results/toy")
    dashboard.on_start(RunMeta("toy_mlp", "Adam", 0, "cpu", 3, 3, 8, 99, instruments={"parameters": ["w"], "quantities": {"GradNorm": "every step"}}))
    dashboard.on_eval(EvalRecord(0, 0, 0.0, {"valid": SplitMetrics(2.0, 0.25, 10)}))
    for step in range(3):
        dashboard.on_step(StepRecord(step, 0, 1.0 / (step + 1), [0.01], 0.1 * step, {"GradNorm": [0.5]}))
    dashboard.on_end(RunEnd(RunStatus.COMPLETED, 3, 1, train_seconds=0.3))
    output = stream.getvalue()
    assert "Cockpit for Adam" in output and "step 3/3" in output and "completed" in output
    assert "cockpit diagnose results/toy" in render(dashboard.final_summary(), 100)


def test_a_resumed_runs_dashboard_shows_the_records_from_before_its_checkpoint() -> None:
    kept_steps = [{"step": step, "epoch": 0, "loss": 2.0 - 0.1 * step, "lr": [0.01], "time": 0.1 * step, "quantities": {"GradNorm": [0.5]}} for step in range(5)]
    kept_evals = [{"step": 0, "epoch": 0, "time": 0.0, "splits": {"valid": {"loss": 2.0, "accuracy": 0.1}}}]
    dashboard = LiveDashboard(Console(file=io.StringIO(), width=120), run_dir="results/toy", history=(kept_steps, kept_evals))
    dashboard.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 8, 8, 8, 99, instruments={"parameters": ["w"], "quantities": {"GradNorm": "every step"}}))
    assert "running" in render(dashboard._renderable(), 120) and "waiting" not in render(dashboard._renderable(), 120)  # not the frame built before the start
    dashboard.on_step(StepRecord(5, 0, 1.4, [0.01], 0.5, {"GradNorm": [0.25]}))
    dashboard.close()
    assert list(dashboard.state.get("loss").steps) == [0, 1, 2, 3, 4, 5]
    assert list(dashboard.state.get("GradNorm").values) == [0.5] * 5 + [0.25]
    assert [record["step"] for record in dashboard.state.evals] == [0]


def test_a_quantity_switched_off_during_the_run_says_so_in_its_panel_and_the_alerts() -> None:
    stream = io.StringIO()
    dashboard = LiveDashboard(Console(file=stream, width=160), run_dir="results/toy")
    dashboard.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 3, 3, 8, 99, instruments={"parameters": ["w"], "quantities": {"GradNorm": "every step", "HessTrace": "every step", "TICDiag": "every step"}}))
    dashboard.on_warning("TICDiag, HessTrace switched off: the curvature diagonal (hessian) would need about 9.0 GiB")
    dashboard.on_warning("3 steps had a non-finite loss")  # not a quantity: an alert only
    reason = "the curvature diagonal (hessian) would need about 9.0 GiB"
    assert dashboard.state.info.unavailable == {"TICDiag": reason, "HessTrace": reason}
    assert "unavailable: the curvature diagonal (hessian) would need about 9.0 GiB" in render(panels.hess_trace(dashboard.state), 160)
    dashboard.on_end(RunEnd(RunStatus.COMPLETED, 3, 1, train_seconds=0.3, warnings=[f"TICDiag, HessTrace switched off: {reason}"]))
    alerts = [text for _, text in dashboard.state.alerts.values()]
    assert alerts.count(f"TICDiag, HessTrace switched off: {reason}") == 1


def test_quantities_the_run_cannot_track_are_said_at_the_start_one_line_per_reason() -> None:
    unavailable = {"CABS": "plain SGD only", "EarlyStopping": "plain SGD only", "HessTrace": "no curvature rule"}
    state = DashboardState()
    state.start(RunInfo.from_mapping({"problem": "toy", "instruments": {"quantities": ECONOMY, "unavailable": unavailable}}))
    assert [(severity, text) for severity, text in state.alerts.values()] == [
        ("warning", "CABS, EarlyStopping not tracked: plain SGD only"),
        ("warning", "HessTrace not tracked: no curvature rule"),
    ]
    stream = io.StringIO()
    log = PlainLog(console=Console(file=stream, width=200))
    log.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 3, 3, 8, 99, instruments={"unavailable": unavailable}))
    assert stream.getvalue().splitlines()[1:] == ["note: CABS, EarlyStopping not tracked: plain SGD only", "note: HessTrace not tracked: no curvature rule"]
    state = DashboardState()
    state.start(RunInfo.from_mapping({"problem": "toy", "instruments": {"quantities": ECONOMY}}))
    assert not state.alerts


def test_plain_log_prints_each_warning_once_when_it_arises_or_at_the_end() -> None:
    stream = io.StringIO()
    log = PlainLog(console=Console(file=stream, width=200))
    log.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 3, 3, 8, 99))
    log.on_warning("HessTrace switched off: too large")
    log.on_end(RunEnd(RunStatus.COMPLETED, 3, 1, train_seconds=0.3, warnings=["HessTrace switched off: too large", "2 steps had a non-finite loss"]))
    lines = stream.getvalue().splitlines()
    assert lines[1:] == ["warning: HessTrace switched off: too large", "warning: 2 steps had a non-finite loss", "run completed after 3 steps (0.3s)"]


def test_plain_log_prints_every_nth_step_the_last_and_the_first_of_each_stretch_of_non_finite_ones() -> None:
    stream = io.StringIO()
    log = PlainLog(every=5, console=Console(file=stream, width=200))
    log.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 24, 24, 8, 99, processes={"world_size": 2, "backend": "gloo"}))
    non_finite = {7, 12, 13, 14, 16, 17, 18, 19, 21, 22}  # under training.on_nonfinite: skip, whole stretches are
    for step in range(24):
        quantities = {"GradNorm": [3.0, 4.0], "Alpha": 0.25} if step == 10 else {}
        log.on_step(StepRecord(step, 0, math.nan if step in non_finite else 1.0, [0.1], float(step), quantities))
    log.on_eval(EvalRecord(12, 1, 12.0, {"valid": SplitMetrics(0.5, 0.875, 8), "test": SplitMetrics(0.25, None, 8)}))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "training toy_mlp (99 parameters) with SGD on cpu (2 processes, gloo): 24 steps, 24 per epoch, batch size 8"
    assert [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step")] == [0, 5, 7, 10, 12, 15, 16, 20, 21, 23]
    assert "loss nan" in next(line for line in lines if line.startswith("step      7/"))
    assert "alpha 0.25  grad-norm 5  " in next(line for line in lines if line.startswith("step     10/"))  # the total norm over the parameters
    assert lines[-1] == "eval after step 12 (epoch 1): valid loss 0.5 acc 0.875 | test loss 0.25"
    every_step = PlainLog(every=0, console=Console(file=io.StringIO()))  # at least every step
    every_step.on_step(StepRecord(3, 0, 1.0, [0.1], 1.0))
    assert every_step.console.file.getvalue().startswith("step      3/0")


def test_plain_log_colours_alerts_by_severity() -> None:
    stream = io.StringIO()
    log = PlainLog(console=Console(file=stream, force_terminal=True, color_system="standard", width=200, highlight=False))
    log.add_alert("warning", "lr_too_large: ...")
    log.add_alert("critical", "divergence: ...")
    log.add_alert("info", "noisy_gradients: ...")
    yellow, red, plain = stream.getvalue().splitlines()
    assert "\x1b[33malert (warning)" in yellow and "\x1b[31malert (critical)" in red and plain == "alert (info) noisy_gradients: ..."


def test_the_header_measures_speed_over_the_recent_steps_and_counts_epochs_up() -> None:
    from cockpit_cli.display.panels.header import ProgressLine, header, steps_per_second

    state = DashboardState()
    info = {"problem": "toy_mlp", "optimizer": "SGD", "device": "cpu", "total_steps": 100, "steps_per_epoch": 30, "batch_size": 32, "num_parameters": 1234}
    state.start(RunInfo.from_mapping(info))
    for step in range(60):
        state.add_step(step, step // 30, 1.0, [0.1], float(step) if step < 10 else 9.0 + 0.1 * (step - 9), {})  # slow at first
    assert steps_per_second(state) == pytest.approx(10.0)  # the last 50 steps, not the slow start
    text = render(header(state.snapshot(clock=14.0)), 160)
    assert "epoch 1/4" in text  # 100 steps of 30: a fourth, partial epoch
    assert re.search(r"remaining 0:04\b", text)  # 40 steps at 10 per second
    state.finish("completed", None, seconds=14.0)
    assert "remaining -" in render(header(state.snapshot()), 160)
    stalled = DashboardState()
    stalled.start(RunInfo.from_mapping(info))
    for step, time in ((0, 5.0), (1, 5.0)):
        stalled.add_step(step, 0, 1.0, [0.1], time, {})
    assert steps_per_second(stalled) is None
    stalled.add_step(2, 0, 1.0, [0.1], 4.0, {})  # a clock that went back (a resumed run)
    assert steps_per_second(stalled) is None
    full, half = ProgressLine(1.0).line(10), ProgressLine(0.5).line(10)
    assert full.spans[0].style == GOOD and half.spans[0].style == "cyan" and half.plain == "━" * 10


def test_the_header_and_hyperparameters_show_a_batch_of_micro_batches() -> None:
    from cockpit_cli.display.panels.header import header
    from cockpit_cli.display.panels.hyperparameters import hyperparameters

    state = DashboardState()
    info = {"problem": "api", "optimizer": "SGD", "device": "cpu", "batch_size": 64, "micro_batch_size": 16, "micro_batches": 4, "num_parameters": 10}
    state.start(RunInfo.from_mapping(info))
    state.add_step(0, 0, 1.0, [0.1], 1.0, {})
    assert "batch 64 (4 micro-batches) · cpu" in render(header(state.snapshot()), 160)
    assert re.search(r"batch +64 4 micro-batches", render(hyperparameters(state.snapshot()), 60))


def test_the_performance_panel_shows_the_recent_evaluations_and_the_best_one() -> None:
    from cockpit_cli.display.panels.performance import best_valid, performance

    state = make_state(steps=10)
    for step, accuracy in ((20, 0.8), (30, 0.6), (40, 0.7)):
        state.add_eval(step, 1, float(step), {"valid": {"loss": 1.0 - accuracy, "accuracy": accuracy}})
    assert best_valid(state.evals)["step"] == 20  # the highest accuracy, not the last
    text = render(performance(state.snapshot()), 120)
    table_steps = [int(line.split()[1]) for line in text.splitlines() if re.match(r"│ +\d+ ", line)]
    assert table_steps == [20, 30, 40]  # the last three evaluations, oldest first
    assert "best valid 80.0% (loss 0.2) at step 20" in text
    coloured = Console(file=io.StringIO(), width=120, color_system="standard", force_terminal=True)
    coloured.print(performance(state.snapshot()))
    assert "\x1b[1;32m  20\x1b[0m" in coloured.file.getvalue() and "\x1b[1;32m  30" not in coloured.file.getvalue()  # the best row in bold green
    losses_only = [{"step": step, "splits": {"valid": {"loss": loss, "accuracy": None}}} for step, loss in ((0, 2.0), (5, 0.5), (9, 0.9))]
    assert best_valid(losses_only)["step"] == 5  # without accuracy: the lowest loss
    state = make_state(steps=10)
    state.evals[:] = losses_only
    text = render(performance(state.snapshot()), 120)
    assert "valid loss" in text and "best valid (loss 0.5) at step 5" in text


def test_the_summary_of_a_diverged_run_gives_its_message_best_result_and_other_alerts() -> None:
    state = make_state()
    state.add_eval(50, 2, 3.0, {"valid": {"loss": 0.5, "accuracy": 0.8}})
    state.add_eval(60, 3, 4.0, {"valid": {"loss": 2.0, "accuracy": 0.3}})
    for number in range(4):
        state.add_alert("warning", f"rule_{number}: something", f"rule_{number}")
    state.add_alert("critical", "the loss became nan at step 60", "nan")
    state.finish("diverged", "the loss became nan at step 60", seconds=5.0)
    lines = [line.strip("│ ") for line in render(panels.summary(state), 200).splitlines()]
    assert "the loss became nan at step 60" in lines  # the message on a line of its own
    assert any(line.startswith("best valid") and line.endswith("0.5 80.0% at step 50") for line in lines)
    assert any(line.startswith("mini-batch loss") and line.endswith("(smoothed)") for line in lines)
    alerts = next(line for line in lines if line.startswith("alerts"))
    assert alerts.count("rule_") == 3 and "nan" not in alerts  # three at most, not the message again


@pytest.mark.parametrize(("status", "colour"), [("completed", "\x1b[32m"), ("interrupted", "\x1b[33m"), ("diverged", "\x1b[31m")])
def test_the_summary_border_shows_how_the_run_ended(status: str, colour: str) -> None:
    state = make_state()
    state.finish(status, None, seconds=5.0)
    console = Console(file=io.StringIO(), width=100, color_system="standard", force_terminal=True)
    console.print(panels.summary(state))
    assert console.file.getvalue().startswith(f"{colour}╭")


def coloured(renderable: RenderableType, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system="standard", force_terminal=True)
    console.print(renderable)
    return console.file.getvalue()


def test_alpha_bins_clamp_to_the_edges_skip_non_finite_values_and_colour_by_distance_from_zero() -> None:
    from cockpit_cli.display.panels.alpha import bin_counts, bin_style

    counts = bin_counts([-9.0, -1.5, 0.0, 1.49, 1.5, 9.0, math.nan, math.inf])
    assert (counts[0], counts[7], counts[14], sum(counts)) == (2, 1, 3, 6)
    assert [bin_style(index) for index in (7, 5, 4, 2, 14)] == [f"bold underline {GOOD}", GOOD, WATCH, ACT, ACT]  # centres 0, -0.4, -0.6, -1, 1.4


def test_alpha_medians_are_coloured_and_a_long_run_shows_its_last_steps() -> None:
    state = make_state(steps=20)
    for step in range(20, 45_000):  # 45,000 values: a tenth is beyond the kept tail
        state.add_step(step, 1, 1.0, [0.1], float(step), {"Alpha": 1.2 if step >= 45_000 - 4096 else 0.0})
    text = coloured(panels.alpha(state.snapshot()), 60)
    assert "median (last 4096)" in text
    line = next(line for line in text.splitlines() if "median (last 4096)" in line)
    assert re.search(r"\x1b\[31m *1\.2\x1b", line)  # all of the last 4096 overshoot: red
    line = next(line for line in text.splitlines() if "median (all)" in line)
    assert re.search(r"\x1b\[32m *0\x1b", line)  # most steps were ideal: green


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    from cockpit_cli.display.state import sorted_median

    assert (sorted_median([]), sorted_median([3.0]), sorted_median([1.0, 2.0, 4.0, 9.0])) == (None, 3.0, 3.0)


def test_the_alpha_medians_are_not_moved_by_one_wild_step() -> None:
    state = DashboardState()
    state.start(RunInfo.from_mapping({"problem": "toy", "instruments": {"quantities": ["Alpha"]}}))
    for step, value in enumerate([0.1, -0.2, 0.3, 500.0, math.nan, 0.2]):
        state.add_step(step, 0, 1.0, [0.1], float(step), {"Alpha": value})
        if step == 0:
            snapshot = state.snapshot()
    assert snapshot.alpha_median == 0.1  # a snapshot keeps its own number
    assert state.alpha_median == 0.2  # of 0.1, -0.2, 0.3, 500, 0.2 (NaN left out); the mean would be 100
    text = render(panels.alpha(state.snapshot()), 60)
    assert re.search(r"median \(all\) +0\.2 ", text) and re.search(r"median \(last 5\) +0\.25 ", text)  # -0.2, 0.3, 500, 0.2


@pytest.mark.parametrize(("count", "window", "label"), [(3, 3, "last 3"), (20, 5, "last 5"), (50, 5, "last 10%"), (51, 6, "last 10%"), (400, 40, "last 10%")])
def test_the_recent_alpha_window_is_a_tenth_but_never_fewer_than_five(count: int, window: int, label: str) -> None:
    """A tenth of the quick-start's 20 tracked steps is two, whose median is their mean: an Alpha
    of -19 from one nearly flat fit moved it to -8.9 while the other 19 were near 1."""
    from cockpit_cli.recent import recent_count, recent_label

    assert (recent_count(count), recent_label(count)) == (window, label)
    state = DashboardState()
    state.start(RunInfo.from_mapping({"problem": "toy", "instruments": {"quantities": ["Alpha"]}}))
    for step in range(count):
        state.add_step(step, 0, 1.0, [0.1], float(step), {"Alpha": -19.0 if step == count - 2 else 1.0})
    text = render(panels.alpha(state.snapshot()), 60)
    assert re.search(rf"median \({label}\) +1 ", text), text


@pytest.mark.parametrize(("lr", "colour"), [(0.01, "\x1b[32m"), (0.05, "\x1b[33m"), (0.1, "\x1b[1;31m")])
def test_lr_times_the_top_eigenvalue_is_coloured_against_gd_stability(lr: float, colour: str) -> None:
    state = make_state(steps=2, curvature=True, tracked=[*ECONOMY, "HessMaxEV"])
    state.add_step(2, 0, 1.0, [lr], 1.0, {"HessMaxEV": 30.0})  # lr * 30: 0.3, 1.5, 3
    line = next(line for line in coloured(panels.hess_max_ev(state.snapshot())).splitlines() if "lr·λmax" in line)
    assert f"{colour}{lr * 30:g}" in line


def test_a_curvature_history_with_negative_values_is_drawn_on_a_linear_scale() -> None:
    state = make_state(steps=0, tracked=[*ECONOMY, "HessTrace"])
    for step, trace in enumerate([-1.0, 2.0, 3.0, -4.0, 5.0]):
        state.add_step(step, 0, 1.0, [0.1], float(step), {"HessTrace": [trace]})
    line = next(line for line in render(panels.hess_trace(state.snapshot()), 60).splitlines() if "trace" in line and "5" in line)
    assert len(re.findall(r"[▁▂▃▄▅▆▇█]", line)) == 5  # no gap where a logarithm is missing


@pytest.mark.parametrize(("value", "colour"), [(0.5, "\x1b[32m"), (2.0, "\x1b[33m"), (4.0, "\x1b[31m")])
def test_gradient_test_values_are_coloured_against_one(value: float, colour: str) -> None:
    state = make_state(steps=0)
    state.add_step(0, 0, 1.0, [0.1], 0.0, {"NormTest": value})
    line = next(line for line in coloured(panels.grad_tests(state.snapshot())).splitlines() if "norm" in line)
    assert f"{colour}{value:g}" in line


def test_numbers_are_short_and_durations_read_as_clocks() -> None:
    from cockpit_cli.display.panels.common import duration, num

    assert [num(None), num(True), num("adam"), num(math.nan), num(-math.inf)] == ["-", "True", "adam", "nan", "-inf"]
    assert [num(99_999), num(123_456), num(2_500_000), num(3 * 10**9), num(5 * 10**12)] == ["99999", "123k", "2.5M", "3G", "5T"]
    assert [num(0.123456), num(12.3456), num(0.0), num(1.2e-5), num(0.00099), num(123456.0), num(-2.5e7)] == ["0.123", "12.3", "0", "1.2e-5", "9.9e-4", "1.2e+5", "-2.5e+7"]
    assert num(0.123456, 2) == "0.12"
    assert [duration(None), duration(-1.0), duration(math.nan), duration(59.9), duration(62.0), duration(3723.0)] == ["-", "-", "-", "0:59", "1:02", "1:02:03"]


def test_gradient_histogram_panel_uses_the_recorded_range_and_shows_a_single_count() -> None:
    counts = [0] * 20
    counts[10], counts[3] = 10**12, 1
    state = make_state(steps=0)
    state.add_step(0, 0, 1.0, [0.1], 0.0, {"GradHist1d": {"counts": counts, "range": [-0.5, 0.5]}})
    lines = render(panels.grad_hist(state.snapshot()), 40).splitlines()
    assert "◂-0.5" in lines[-3] and "0.5▸" in lines[-3]
    bottom = lines[-4][2:]  # after the frame and its padding
    assert bottom[3] != " " and bottom[10] != " "  # a bin of one element is drawn beside one of 10^12


def test_layer_table_helpers() -> None:
    from cockpit_cli.display.panels.layers import activation_zero_fractions, fraction_style, order

    activations = {"0": {"zero_fraction": 0.7}, "1": {"zero_fraction": 0.3}, "2": {"zero_fraction": 0.2}, "3": {"zero_fraction": 0.05}, "4": {"mean": 1.0}}
    assert activation_zero_fractions(["0.weight", "0.bias", "2.weight"], activations) == {"0": 0.7, "2": 0.2}  # the most of a layer and what follows it
    assert [fraction_style(value, 0.2, 0.5) for value in (None, 0.1, 0.3, 0.6)] == ["dim", GOOD, WATCH, ACT]
    assert [order(None), order(math.nan), order(8e-3), order(2e5), order(0.5)] == ["-", "nan", "8e-3", "2e+5", "5e-1"]


def test_a_layer_row_turns_yellow_when_most_of_its_units_output_zero() -> None:
    state = DashboardState()
    info = {"problem": "toy", "optimizer": "SGD", "device": "cpu", "total_steps": 10, "steps_per_epoch": 5, "batch_size": 8, "num_parameters": 10}
    state.start(RunInfo.from_mapping({**info, "instruments": {"parameters": ["0.weight", "2.weight"], "quantities": ["LayerStats", "Activations"]}}))
    stats = {"grad_norm": [1.0, 1.0], "weight_norm": [1.0, 1.0], "update_ratio": [1e-3, 1e-3], "zero_grad_fraction": [0.0, 0.0]}
    state.add_step(0, 0, 1.0, [0.1], 0.0, {"LayerStats": stats, "Activations": {"0": {"zero_fraction": 0.6}, "2": {"zero_fraction": 0.0}}})
    lines = coloured(panels.layers(state.snapshot())).splitlines()
    assert "\x1b[33m0.weight" in next(line for line in lines if "0.weight" in line) and "\x1b[33m60%" in next(line for line in lines if "0.weight" in line)
    assert "\x1b[33m2.weight" not in next(line for line in lines if "2.weight" in line)


def test_the_alerts_border_takes_the_most_severe_colour_and_every_learning_rate_is_shown() -> None:
    state = make_state(steps=2)
    state.add_alert("warning", "lr_too_large: ...", "a")
    state.add_alert("critical", "divergence: ...", "b")
    assert coloured(panels.alerts(state.snapshot())).startswith("\x1b[1;31m╭")
    state.add_step(2, 0, 1.0, [0.1, 0.01], 1.0, {})
    assert "0.1, 0.01" in render(panels.hyperparameters(state.snapshot()), 80)


def test_a_long_series_summarises_its_history_in_equal_buckets() -> None:
    series = Series()
    count = 4 * COARSE + 3  # buckets of 2 after the first fill, then 4 ... and a partial one at the end
    for step in range(count):
        series.append(step, float(step))
    history = series.history()
    assert len(history) <= 2 * COARSE + 1
    steps = {round(b - a, 9) for a, b in zip(history[:-2], history[1:-1])}
    assert len(steps) == 1  # every full bucket spans as many steps
    assert history[-1] == pytest.approx(sum(range(count - count % series._bucket, count)) / (count % series._bucket))  # the partial bucket's mean
    assert len(series.tail(0)) == 0 and list(series.tail(2)) == [count - 2.0, count - 1.0]


def test_sparkline_pictures_average_fill_and_mark_their_values() -> None:
    from cockpit_cli.display.sparkline import EIGHTHS, MISSING, downsample, gauge, hbar

    assert downsample([0.0, 2.0, 4.0, 6.0], 2) == [1.0, 5.0]
    assert hbar(math.nan, 5) == MISSING and hbar(0.55, 2) == "█" + EIGHTHS[1] and hbar(2.0, 3) == "███"
    styles = {value: next(span.style for span in gauge(value, 13).spans if "●" in gauge(value, 13).plain[span.start:span.end]) for value in (0.5, 2.0, 5.0)}
    assert styles == {0.5: "bold green", 2.0: "bold yellow", 5.0: "bold red"}
    assert gauge(0.01, 13).plain[0] == "●" and gauge(100.0, 13).plain[-1] == "●"  # beyond the scale: at its ends


def test_the_live_dashboard_keeps_evaluations_and_end_warnings_and_reuses_its_frame_while_training() -> None:
    dashboard = LiveDashboard(Console(file=io.StringIO(), width=120), run_dir="results/toy", refresh_per_second=0.1)
    dashboard.on_start(RunMeta("toy_mlp", "SGD", 0, "cpu", 3, 3, 8, 99))
    dashboard.on_eval(EvalRecord(0, 0, 0.0, {"valid": SplitMetrics(2.0, 0.25, 10)}))
    assert dashboard.state.evals[-1]["splits"]["valid"] == {"loss": 2.0, "accuracy": 0.25}
    first = dashboard._renderable()
    dashboard.on_step(StepRecord(0, 0, 1.0, [0.01], 0.1, {}))
    assert dashboard._renderable() is first  # a new frame at most every REDRAW_SECONDS while training
    dashboard.on_end(RunEnd(RunStatus.COMPLETED, 1, 0, train_seconds=0.3, warnings=["2 steps had a non-finite loss"]))
    assert [text for _, text in dashboard.state.alerts.values()] == ["2 steps had a non-finite loss"]  # said only at the end
    assert dashboard._renderable() is not first  # after the end: drawn again for every change


def test_an_embedding_table_s_zero_rows_are_not_flagged() -> None:
    """Its gradient is zero but in the rows of a batch's ids, by construction."""
    state = make_state()
    state.latest["LayerStats"]["zero_grad_fraction"] = [0.93, 0.0, 0.0, 0.0, 0.0]
    assert "93%" in render(panels.layers(state), 100) and "1 flagged" in render(panels.layers(state), 100)
    state.info.lookup_tables = {"0.weight"}
    assert "93%" in render(panels.layers(state), 100) and "0 flagged" in render(panels.layers(state), 100)
