"""``layers.png``: one row of small charts per layer, for comparing layers at a glance.

Columns: gradient norm, weight norm and update/weight ratio of the layer over training (from
LayerStats, on the same axes in every row), and a heat map of the layer's per-sample gradient
histogram over time (from GradHist1d's per-parameter counts). A layer is a parameter-name prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from cockpit_cli.diagnosis.windows import Series
from cockpit_cli.report.data import RunView
from cockpit_cli.report.plotting import BASE_FONT_SIZE, PRIMARY, SECONDARY, STEP_LABEL, TERTIARY, empty_panel, figure_title, finite, log_y, new_figure, save, step_limits, style

MAX_LAYERS = 24  # more layers are thinned to this many, evenly spread, first and last kept
COLUMNS = (
    ("grad_norm", "Gradient norm", "‖g‖ of the layer (L2)", PRIMARY),
    ("weight_norm", "Weight norm", "‖θ‖ of the layer (L2)", TERTIARY),
    ("update_ratio", "Update / weight ratio", "‖Δθ‖ / ‖θ‖ per step", SECONDARY),
)
HEATMAP_TITLE = "Gradient histogram over time"
MARKED = 30  # a line of fewer tracked values marks each (one finite value draws no line)
EMPTY = Series([], [])


def shown_layers(names: list[str]) -> list[str]:
    """At most :data:`MAX_LAYERS` of ``names``, evenly spread, first and last included."""
    if len(names) <= MAX_LAYERS:
        return names
    picks = sorted({round(i * (len(names) - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)})
    return [names[i] for i in picks]


def _heatmap(ax: Axes, steps: list[int], counts: list[list[int]], value_range: tuple[float, float], span: tuple[int, int]) -> object | None:
    """Draw one layer's histograms over time as shares of its elements per bin (log colour).

    ``value_range`` is the y extent: the histograms' value range, or ``(0, 1)`` for the relative
    position in each step's own (adaptive) range.
    """
    rows = [row for row in counts if row]
    if not rows:
        return None
    matrix = np.asarray(rows, dtype=float).T  # (bins, steps)
    shares = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1)
    half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5  # each column centred on its step
    first, last = steps[0] - half, steps[-1] + half
    image = ax.imshow(
        np.where(shares > 0, shares, np.nan),
        origin="lower",
        aspect="auto",
        extent=(first, last, value_range[0], value_range[1]),
        cmap="magma_r",
        norm=LogNorm(vmin=1e-6, vmax=1),
        interpolation="nearest",
    )
    step_limits(ax, span)
    return image


def layers_figure(view: RunView) -> Figure:
    """Build the per-layer figure of ``view``."""
    stats = view.layer_stats()
    names = shown_layers(list(stats)) or ["(no layers recorded)"]
    histograms = view.layer_histograms()
    span = view.step_span()
    height = 1.9 * len(names) + 1.8
    figure = new_figure(18, height)
    grid = figure.add_gridspec(len(names), 4, width_ratios=[1, 1, 1, 1.25], hspace=0.35, wspace=0.32, left=0.08, right=0.93, top=1 - 1.15 / height, bottom=0.75 / height)
    axes = [[figure.add_subplot(grid[row, column]) for column in range(4)] for row in range(len(names))]
    image = None
    for row, layer in enumerate(names):
        last_row = row == len(names) - 1
        for column, (kind, title, ylabel, color) in enumerate(COLUMNS):
            ax = axes[row][column]
            series = stats.get(layer, {}).get(kind, EMPTY)
            steps, values = finite(series, positive=True)
            zeros = sum(1 for value in series.values if value == 0)
            nonfinite = sum(1 for value in series.values if not np.isfinite(value))
            if not len(values) and not zeros:
                empty_panel(ax, title if row == 0 else "", view.why_empty("LayerStats"))
                continue
            ax.plot(steps, values, color=color, lw=1.5, marker="o" if len(values) < MARKED else None, ms=3)
            notes = [f"{what} at {count} of {len(series)} tracked steps" for what, count in (("exactly 0", zeros), ("non-finite", nonfinite)) if count]
            if notes:
                ax.text(0.98, 0.06, "; ".join(notes), transform=ax.transAxes, ha="right", fontsize=BASE_FONT_SIZE - 1, color="#d62728")
            log_y(ax)
            step_limits(ax, span)
            style(ax, title if row == 0 else "", STEP_LABEL if last_row else None, ylabel if column else f"layer {layer}\n{ylabel}")
        ax = axes[row][3]
        if histograms is None:
            empty_panel(ax, HEATMAP_TITLE if row == 0 else "", view.why_empty("GradHist1d") + " (per-parameter counts)")
            continue
        steps, counts, value_range = histograms
        image = _heatmap(ax, steps, counts.get(layer, []), value_range or (0.0, 1.0), span) or image
        ylabel = "gradient element value" if value_range else "position in the step's range"
        style(ax, HEATMAP_TITLE if row == 0 else "", STEP_LABEL if last_row else None, ylabel)
        ax.grid(False)
    _share_axes(axes)
    if image is not None:
        bar = figure.colorbar(image, ax=[line[3] for line in axes], fraction=0.04, pad=0.02)
        bar.set_label("share of the layer's gradient elements in the bin (log scale)", fontsize=BASE_FONT_SIZE)
        bar.ax.tick_params(labelsize=BASE_FONT_SIZE - 1)
    total = len(view.layer_stats())
    shown = f" (showing {len(names)} of {total} layers)" if total > len(names) else ""
    figure_title(figure, f"Layers of {view.run.name}: {view.run.manifest.get('problem', '?')} with {view.optimizer}{shown}", view.run.manifest)
    return figure


SHARED_MARGIN = 0.05  # of the shared y range (in log space), above the highest line and below the lowest


def _share_axes(axes: list[list[Axes]]) -> None:
    """Give every chart of a column the same y range, with a margin (the row of the extreme values
    had its own range tight around them: a line along the frame would hide in it), and hide x tick
    labels above the last row."""
    for column in range(3):
        used = [line[column] for line in axes if line[column].lines]
        if used:
            low = min(ax.get_ylim()[0] for ax in used)
            high = max(ax.get_ylim()[1] for ax in used)
            if len(used) > 1:
                low, high = _widened(low, high, used[0].get_yscale() == "log")
            for ax in used:
                ax.set_ylim(low, high)
    for line in axes[:-1]:
        for ax in line:
            ax.tick_params(labelbottom=False)


def _widened(low: float, high: float, log: bool) -> tuple[float, float]:
    """``(low, high)`` widened by :data:`SHARED_MARGIN` of its span at each end (in log space on a log axis)."""
    if log and low > 0:
        pad = (np.log(high) - np.log(low)) * SHARED_MARGIN
        return float(np.exp(np.log(low) - pad)), float(np.exp(np.log(high) + pad))
    pad = (high - low) * SHARED_MARGIN
    return low - pad, high + pad


def write_layers_figure(view: RunView, path: Path) -> Path:
    """Write the per-layer figure of ``view`` to ``path``."""
    return save(layers_figure(view), path)
