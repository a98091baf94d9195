"""The overlay plot of ``cockpit compare --plot``: several runs in one figure, one colour each.

Panels: the mini-batch loss (smoothed), the valid accuracy, Alpha, the gradient norm, and one per
extra ``--metric`` (a scalar quantity such as ``NormTest`` or an evaluation metric such as
``valid.loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cockpit_cli.diagnosis.windows import Series
from cockpit_cli.report.data import RunView, eval_metric
from cockpit_cli.report.plotting import BASE_FONT_SIZE, empty_panel, finite, log_y, moving_average, moving_median, new_figure, run_color, run_line_style, save, style, trend_window
from cockpit_cli.storage.reader import RunData

ALPHA_WINDOW = 9  # tracked steps in Alpha's moving median
CURVE = 3  # the fewest values whose moving median the Alpha panel's range keeps in view
LEGEND_ENTRY_INCHES, LEGEND_CHAR_INCHES, LEGEND_ROW_INCHES = 0.75, 0.085, 0.22  # the run legend's layout
TITLE_CHARACTERS = 90  # longer lists of run names are left to the legend


@dataclass(frozen=True)
class Panel:
    """One panel: title, y label, how to get a run's series, how to draw it, the quantity it shows."""

    title: str
    ylabel: str
    get: Callable[[RunView], Series]
    how: str  # "smooth", "scalar", "log" (scatter + moving average), "median" (scatter + moving median) or "evaluation" (lines)
    quantity: str | None = None


BASE_PANELS = (
    Panel("Mini-batch loss (smoothed)", "mini-batch loss (moving average)", RunView.loss, "smooth"),
    Panel("Valid accuracy", "valid accuracy (%)", lambda view: view.evaluation("valid", "accuracy"), "evaluation"),
    Panel("Alpha", "local step length α (moving median)", lambda view: view.quantity("Alpha"), "median", "Alpha"),
    Panel("Gradient norm", "‖g‖ (L2, mini-batch)", RunView.grad_norm, "log", "GradNorm"),
)


def metric_panel(name: str) -> Panel:
    """The panel of an extra metric: an evaluation metric or a scalar quantity."""
    parsed = eval_metric(name)
    if parsed:
        unit = " (%)" if parsed[1] == "accuracy" else ""
        return Panel(f"{parsed[0]} {parsed[1]}", f"{parsed[0]} {parsed[1]}{unit}", lambda view: view.metric(name), "evaluation")
    return Panel(name, f"{name} (moving average)", lambda view: view.quantity(name), "scalar", name)


def _draw(ax: Axes, views: Sequence[RunView], panel: Panel) -> bool:
    """Overlay every run's series of ``panel`` on ``ax``; ``False`` when no run has data."""
    how = panel.how
    drawn, shown, lines = False, [], []
    for index, view in enumerate(views):
        steps, values = finite(panel.get(view), positive=how == "log")
        if not len(values):
            continue
        shown.append(values)
        color, label, dashes = run_color(index), view.run.name, run_line_style(index)
        if how == "evaluation":
            scale = 100 if panel.title.endswith("accuracy") else 1
            ax.plot(steps, scale * values, marker="o", ms=4, lw=1.6, color=color, ls=dashes, label=label)
        else:
            ax.scatter(steps, values, s=5, color=color, alpha=0.25, edgecolors="none")
            if how == "median":
                smoothed = moving_median(values, ALPHA_WINDOW)
            elif how == "log":  # of the logarithms, as the axis shows them (a line fitted to the values can end below zero)
                smoothed = np.exp(moving_average(steps, np.log(values), trend_window(len(values))))
            else:
                smoothed = moving_average(steps, values, trend_window(len(values)))
            ax.plot(steps, smoothed, color=color, lw=1.8, ls=dashes, label=label)
            lines.append(smoothed)
        drawn = True
    if drawn:
        if how == "log":
            log_y(ax)
        elif how != "evaluation":
            if how == "median":  # the middle 80% of the points and nearly all of the medians: a few wild values fall outside
                curves = [index for index, points in enumerate(shown) if len(points) >= CURVE] or range(len(shown))  # not a run diverged at once
                values, smoothed = np.concatenate([shown[index] for index in curves]), np.concatenate([lines[index] for index in curves])
                low, high = min(np.percentile(values, 10), np.percentile(smoothed, 2)), max(np.percentile(values, 90), np.percentile(smoothed, 98))
            else:
                low, high = np.percentile(np.concatenate(shown), [2, 98])
            pad = 0.15 * (high - low) or 0.1 * abs(high) or 1.0
            ax.set_ylim(low - pad, high + pad)
        style(ax, panel.title, ylabel=panel.ylabel)
    return drawn


def _legend_label(view: RunView) -> str:
    """The run's name, with how it ended when it did not complete (a run that diverged early can
    be off every panel's scale)."""
    status = view.run.manifest.get("status", "unknown")
    if status == "completed":
        return view.run.name
    return f"{view.run.name} ({status} after {view.run.manifest.get('steps_completed', len(view.run.steps))} steps)"


def compare_figure(runs: Sequence[RunData], metrics: Sequence[str] = ()) -> Figure:
    """Build the overlay figure of ``runs`` with the base panels and one per metric."""
    views = [RunView(run) for run in runs]
    panels = list(BASE_PANELS) + [metric_panel(name) for name in metrics]
    columns = 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / columns)
    labels = [_legend_label(view) for view in views]
    entry_inches = LEGEND_ENTRY_INCHES + LEGEND_CHAR_INCHES * max(len(label) for label in labels)
    legend_columns = max(1, min(len(labels), int(0.9 * 6.5 * columns / entry_inches)))  # as many names per row as fit
    top_inches = 1.2 + LEGEND_ROW_INCHES * math.ceil(len(labels) / legend_columns)
    height = 4.2 * rows + 0.75 + top_inches
    figure = new_figure(6.5 * columns, height)
    grid = figure.add_gridspec(rows, columns, hspace=0.45, wspace=0.25, left=0.07, right=0.98, top=1 - top_inches / height, bottom=0.5 / height + 0.04)
    for number, panel in enumerate(panels):
        ax = figure.add_subplot(grid[number // columns, number % columns])
        if not _draw(ax, views, panel):
            why = f": {views[0].why_empty(panel.quantity)}" if panel.quantity else ""
            empty_panel(ax, panel.title, f"no run has {panel.title.lower()}{why}")
    handles = [Line2D([], [], color=run_color(index), ls=run_line_style(index), lw=2, label=label) for index, label in enumerate(labels)]
    below_title = 1 - 0.58 / height  # rows of their own: long run names ran into the title
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.065, below_title), ncol=legend_columns, fontsize=BASE_FONT_SIZE + 1, frameon=False)
    names = ", ".join(view.run.name for view in views)
    title = f"Comparison of {names}" if len(names) <= TITLE_CHARACTERS else f"Comparison of {len(views)} runs"
    figure.suptitle(title, x=0.07, ha="left", fontsize=BASE_FONT_SIZE + 6, fontweight="bold")
    return figure


def write_compare_figure(runs: Sequence[RunData], metrics: Sequence[str], path: Path) -> Path:
    """Write the overlay figure of ``runs`` to ``path``."""
    return save(compare_figure(runs, metrics), path)
