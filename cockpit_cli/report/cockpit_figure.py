"""``cockpit.png``: the full Cockpit figure in the arrangement of the original Cockpit.

Three coloured columns, STEP SIZE (Alpha, Distance with UpdateSize, GradNorm), GRADIENTS
(gradient tests, 1-D histogram, 2-D histogram) and CURVATURE (HessMaxEV, HessTrace, TIC), over a
bottom row with HYPERPARAMETERS (learning rate) and PERFORMANCE (mini-batch loss with the
train/valid accuracy). Scalars are scattered coloured by iteration with a moving average.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.gridspec import SubplotSpec

from cockpit_cli.diagnosis.windows import Series
from cockpit_cli.report.data import RunView
from cockpit_cli.report.gauges import alpha_gauge, gradient_tests_gauge, histogram_1d_gauge, histogram_2d_gauge
from cockpit_cli.storage.schema import trace_names
from cockpit_cli.report.plotting import (
    BASE_FONT_SIZE,
    AVERAGE_COLOR,
    NEUTRAL,
    PRIMARY,
    SECONDARY,
    TERTIARY,
    column_background,
    empty_panel,
    ending,
    finite,
    log_y,
    new_figure,
    nonfinite_steps,
    save,
    scatter_average,
    step_limits,
    style,
)

INNER = {"width_ratios": [0.16, 1, 0.16], "height_ratios": [0.02, 1, 1, 1, 0.02], "hspace": 0.62}


def scalar_panel(figure: Figure, spec: SubplotSpec, view: RunView, name: str, title: str, ylabel: str, series: Series | None = None) -> Axes:
    """A scalar quantity scattered by iteration with its moving average (log y when all positive)."""
    ax = figure.add_subplot(spec)
    data = view.quantity(name) if series is None else series
    _, values = finite(data)
    if not len(values):
        empty_panel(ax, title, view.why_empty(name))
        return ax
    log = name in ("HessMaxEV", "GradNorm") and bool(np.all(values > 0))
    scatter_average(ax, data, view.step_span(), log=log)
    style(ax, title, ylabel=f"{ylabel}, log scale" if log else ylabel)
    return ax


def distance_panel(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """Distance from the initial parameters, with the size of each update on a twin axis."""
    ax = scalar_panel(figure, spec, view, "Distance", "Distance", "‖θ_t − θ_0‖ (L2, from init)")
    steps, sizes = finite(view.quantity("UpdateSize"))
    if not len(sizes):
        return
    twin = ax.twinx()
    twin.plot(steps, sizes, ls="none", marker="x", ms=3, color=PRIMARY, label="update size ‖θ_t+1 − θ_t‖ (right)")
    twin.set_ylabel("update size ‖Δθ‖ (L2)", fontsize=BASE_FONT_SIZE, color=PRIMARY)
    twin.tick_params(labelsize=BASE_FONT_SIZE - 1)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=BASE_FONT_SIZE - 2, loc="upper left")


def lr_panel(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """The learning rate over the steps."""
    ax = figure.add_subplot(spec)
    steps, rates = finite(view.lr())
    if not len(rates):
        empty_panel(ax, "Learning rate", "no learning rates recorded")
        return
    ax.plot(steps, rates, color=PRIMARY, lw=1.6)
    if rates.min() > 0 and rates.max() / rates.min() > 100:
        log_y(ax)
    step_limits(ax, view.step_span())
    style(ax, "Learning rate", ylabel="learning rate (largest group)")


def performance_panel(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """The mini-batch loss by iteration, with train_eval and valid accuracy on a twin axis."""
    ax = figure.add_subplot(spec)
    nonfinite = nonfinite_steps(view.loss())
    _, losses = finite(view.loss(), positive=True)
    log = bool(len(losses)) and losses.max() > 1000 * losses.min()  # a loss that blew up would flatten the rest on a linear axis
    if not scatter_average(ax, view.loss(), view.step_span(), log=log, size=6):
        empty_panel(ax, "Performance", f"the loss of every step is non-finite ({len(nonfinite)} steps)" if len(nonfinite) else "no step losses recorded")
        return
    style(ax, "Performance", ylabel="mini-batch loss", title_side="left")  # the legend goes on its right
    if len(nonfinite):  # marked along the top: they have no height to plot at
        label = f"non-finite loss ({len(nonfinite)} step{'s' if len(nonfinite) > 1 else ''})"
        ax.scatter(nonfinite, np.full(len(nonfinite), 0.97), transform=ax.get_xaxis_transform(), marker="v", s=36, color=AVERAGE_COLOR, zorder=5, label=label)
    twin = ax.twinx()
    for split, color in (("train_eval", SECONDARY), ("valid", TERTIARY)):
        steps, accuracy = finite(view.evaluation(split, "accuracy"))
        if len(accuracy) == 1:
            twin.set_ylim(0, 100)
        if len(accuracy):
            twin.plot(steps, 100 * accuracy, marker="o", ms=4, lw=1.6, color=color, label=f"{split} accuracy (right)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if twin.get_lines():
        twin.set_ylabel("accuracy (%)", fontsize=BASE_FONT_SIZE)
        twin.tick_params(labelsize=BASE_FONT_SIZE - 1)
    else:
        twin.set_yticks([])
        top = 0.88 if len(nonfinite) else 0.97  # below the non-finite markers
        ax.text(0.99, top, "no accuracies evaluated", transform=ax.transAxes, ha="right", va="top", fontsize=BASE_FONT_SIZE - 1)
    # above the plot, right of the title: inside, it covers the latest losses or accuracies
    ax.legend(handles, [h.get_label() for h in handles], fontsize=BASE_FONT_SIZE - 1.5, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), frameon=False, borderaxespad=0.2)


def _column(figure: Figure, spec: SubplotSpec, title: str, color: tuple[float, float, float]) -> SubplotSpec:
    """A tinted, titled column; returns its inner grid (instruments go in rows 1 to 3 of column 1)."""
    column_background(figure, spec, title, color)
    return spec.subgridspec(5, 3, **INNER)


def cockpit_figure(view: RunView) -> Figure:
    """Build the cockpit figure of ``view``."""
    figure = new_figure(24, 16)
    outer = figure.add_gridspec(2, 3, height_ratios=[3, 1.05], wspace=0.1, hspace=0.13, left=0.015, right=0.985, top=0.925, bottom=0.03)

    step = _column(figure, outer[0, 0], "STEP SIZE", PRIMARY)
    alpha_gauge(figure, step[1, 1], view)
    distance_panel(figure, step[2, 1], view)
    scalar_panel(figure, step[3, 1], view, "GradNorm", "Gradient norm", "‖g‖ (L2, mini-batch)", view.grad_norm())

    gradients = _column(figure, outer[0, 1], "GRADIENTS", SECONDARY)
    gradient_tests_gauge(figure, gradients[1, 1], view)
    histogram_1d_gauge(figure, gradients[2, 1], view)
    histogram_2d_gauge(figure, gradients[3, 1], view)

    curvature = _column(figure, outer[0, 2], "CURVATURE", TERTIARY)
    scalar_panel(figure, curvature[1, 1], view, "HessMaxEV", "Largest Hessian eigenvalue", "λ_max")
    title, symbol = trace_names(view.run.manifest)
    scalar_panel(figure, curvature[2, 1], view, "HessTrace", title, f"{symbol} (sum over parameters)")
    tic = "TICDiag" if len(view.quantity("TICDiag")) or not len(view.quantity("TICTrace")) else "TICTrace"
    scalar_panel(figure, curvature[3, 1], view, tic, f"Takeuchi information criterion ({tic})", "TIC")

    bottom = {"width_ratios": [0.16, 1, 0.16], "height_ratios": [0.1, 1, 0.2], "hspace": 0.3}
    lr_panel(figure, _bottom(figure, outer[1, 0], "HYPERPARAMETERS", bottom)[1, 1], view)
    performance_panel(figure, _bottom(figure, outer[1, 1:], "PERFORMANCE", {**bottom, "width_ratios": [0.08, 1, 0.08]})[1, 1], view)

    span = view.step_span()
    figure.suptitle(f"Cockpit for {view.optimizer}", fontsize=BASE_FONT_SIZE + 11, fontweight="bold", y=0.99)
    facts = f"{view.run.manifest.get('problem', '?')}  ·  run {view.run.name}  ·  steps {span[0]}-{span[1]}  ·  points coloured by iteration (dark: early, yellow: late), red line: moving average"
    ended = ending(view.run.manifest)
    facts += f"  ·  {ended}" if ended else ""
    figure.text(0.5, 0.955, facts, ha="center", fontsize=BASE_FONT_SIZE + 1, color="#444444")
    return figure


def _bottom(figure: Figure, spec: SubplotSpec, title: str, inner: dict) -> SubplotSpec:
    """A neutral, titled cell of the bottom row and its inner grid."""
    column_background(figure, spec, title, NEUTRAL)
    return spec.subgridspec(3, 3, **inner)


def write_cockpit_figure(view: RunView, path: Path) -> Path:
    """Write the cockpit figure of ``view`` to ``path``."""
    return save(cockpit_figure(view), path)
