"""What every figure shares: colours, the scatter-by-iteration with its moving average, axis
styling, the text of a panel without data, and saving.

Figures are built on :class:`matplotlib.figure.Figure` directly (rendered by the Agg canvas), so
no global pyplot state is touched and no display is needed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cockpit_cli.diagnosis.windows import Series

PRIMARY = (0.29, 0.45, 0.68)  # blue: step size
SECONDARY = (0.95, 0.50, 0.20)  # orange: gradients
TERTIARY = (0.30, 0.60, 0.40)  # green: curvature
NEUTRAL = (0.55, 0.55, 0.60)  # grey: hyperparameters and performance
ITERATION_CMAP = "viridis"
AVERAGE_COLOR = "#d62728"
TREND_SHARE = 25  # the moving average spans a 25th of a series' points (at least 3, at most 51)
RUN_LINE_STYLES = ("-", "--", ":", "-.")
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STEP_LABEL = "iteration (training step)"
BASE_FONT_SIZE = 9.0


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with the report's fonts."""
    figure = Figure(figsize=(width, height), dpi=100)
    figure.patch.set_facecolor("white")
    return figure


def save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as PNG to ``path`` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, facecolor=figure.get_facecolor())
    return path


def trend_window(count: int) -> int:
    """Points in the moving average of a series of ``count`` points: odd, 3 to 51."""
    return min(51, max(3, round(count / TREND_SHARE) // 2 * 2 + 1))


def moving_average(steps: Sequence[float], values: Sequence[float], window: int) -> np.ndarray:
    """A centred moving average that does not lag: at each point, the line fitted to the
    ``window`` points centred on it, read at the point; towards either end the window shrinks to
    stay centred (the first and last points are their own average).

    A trailing average of a series tracked every 64th step trailed its rise by hundreds of steps
    (a top eigenvalue that reached 45 by step 64 read 20 at step 300); a window shifted inward at
    the ends cut across a loss's first sharp drop (357 to 100 in five steps read 150 at step 0).
    With evenly spaced steps the fitted line is the plain mean of the window (its slope term
    vanishes at the centre); with uneven ones (a logarithmic schedule) it is read at the point.

    Args:
        steps: ``[n]`` positions (training steps), increasing.
        values: ``[n]`` finite values.
        window: Points per window (odd; fewer when the series is shorter).

    Returns:
        ``[n]`` smoothed values.
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    count = len(y)
    if count < 3:
        return y.copy()
    x = x - x[0]  # small numbers: the sums of squares below lose nothing
    index = np.arange(count)
    half = np.minimum(window // 2, np.minimum(index, count - 1 - index))  # centred: narrower near the ends
    low, high = index - half, index + half + 1

    def window_sum(column: np.ndarray) -> np.ndarray:
        prefix = np.concatenate(([0.0], np.cumsum(column)))
        return (prefix[high] - prefix[low]) / (high - low)

    mean_x, mean_y = window_sum(x), window_sum(y)
    spread = window_sum(x * x) - mean_x**2
    slope = np.divide(window_sum(x * y) - mean_x * mean_y, spread, out=np.zeros(count), where=spread > 1e-12 * np.maximum(mean_x**2, 1.0))
    return mean_y + slope * (x - mean_x)


def finite(series: Series, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``series`` as arrays, keeping finite (and, if asked, positive) values."""
    steps = np.asarray(series.steps, dtype=float)
    values = np.asarray([math.nan if value is None else value for value in series.values], dtype=float)
    keep = np.isfinite(values) & ((values > 0) if positive else True)
    return steps[keep], values[keep]


def moving_median(values: Sequence[float], window: int) -> np.ndarray:
    """The median of the ``window`` values centred on each, narrower towards the ends but never
    below half the window (shifted inward there): a moving average that one wild value does not
    carry (Alpha has them; narrowed to one value, the last value was the last median) and that does
    not trail the series (a trailing one lagged four tracked steps behind)."""
    array = np.asarray(values, dtype=float)
    count = len(array)
    least = min(count, max(3, window // 2 + 1) | 1)  # odd: the median of an even count is a mean
    medians = []
    for index in range(count):
        size = max(2 * min(window // 2, index, count - 1 - index) + 1, least)
        start = min(max(index - size // 2, 0), count - size)
        medians.append(np.median(array[start : start + size]))
    return np.asarray(medians)


def nonfinite_steps(series: Series) -> np.ndarray:
    """Steps of ``series`` whose value is NaN or infinite (a missing value is none of them)."""
    return np.asarray([step for step, value in zip(series.steps, series.values) if value is not None and not math.isfinite(value)], dtype=float)


def ending(manifest: dict) -> str | None:
    """How a run that did not complete ended, for a figure's title line (``None`` if it completed)."""
    status, message = str(manifest.get("status", "unknown")), manifest.get("message")
    if status == "completed":
        return None
    reason = str(message).split(";")[0] if message else ""
    return reason if reason.startswith(status) else f"{status}: {reason}" if reason else status


def figure_title(figure: Figure, title: str, manifest: dict) -> None:
    """Give ``figure`` its bold title and, below it, how the run ended when it did not complete."""
    figure.suptitle(title, fontsize=BASE_FONT_SIZE + 6, fontweight="bold")
    ended = ending(manifest)
    if ended:
        figure.text(0.5, 1 - 0.62 / figure.get_figheight(), ended, ha="center", fontsize=BASE_FONT_SIZE + 1, color="#444444")


def style(ax: Axes, title: str, xlabel: str | None = STEP_LABEL, ylabel: str | None = None, title_side: str = "center") -> None:
    """Give ``ax`` a bold title (centred, or on the ``left`` to leave room), axis labels and a light grid."""
    ax.set_title(title, fontsize=BASE_FONT_SIZE + 1, fontweight="bold", loc=title_side)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=BASE_FONT_SIZE)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=BASE_FONT_SIZE)
    ax.tick_params(labelsize=BASE_FONT_SIZE - 1)
    ax.grid(True, ls=":", lw=0.6, alpha=0.7)


def empty_panel(ax: Axes, title: str, message: str) -> None:
    """Mark ``ax`` as a panel without data: its title and ``message`` in the middle."""
    ax.set_title(title, fontsize=BASE_FONT_SIZE + 1, fontweight="bold")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f4f4f4")
    width_inches = ax.get_position().width * ax.figure.get_figwidth()
    characters = max(12, int(0.9 * width_inches * 72 / (0.6 * BASE_FONT_SIZE)))
    ax.text(0.5, 0.5, textwrap.fill(message, characters), ha="center", va="center", fontsize=BASE_FONT_SIZE, color="#555555", transform=ax.transAxes)


def scatter_average(ax: Axes, series: Series, span: tuple[int, int], log: bool = False, size: float = 10.0) -> bool:
    """Scatter ``series`` coloured by iteration over ``span`` and draw its moving average.

    Args:
        ax: Where to draw.
        series: Values over steps.
        span: First and last step of the figure (the colour scale, same in every panel).
        log: Use a log y axis (non-positive values are then left out), and average the
            logarithms, as the axis shows them.
        size: Marker size.

    Returns:
        ``False`` when there was nothing to draw.
    """
    steps, values = finite(series, positive=log)
    if not len(values):
        return False
    norm = Normalize(vmin=span[0], vmax=max(span[1], span[0] + 1))
    ax.scatter(steps, values, c=steps, cmap=ITERATION_CMAP, norm=norm, s=size, edgecolors="none", zorder=2)
    window = trend_window(len(values))
    average = np.exp(moving_average(steps, np.log(values), window)) if log else moving_average(steps, values, window)  # on a log axis, of the logarithms
    ax.plot(steps, average, color=AVERAGE_COLOR, lw=1.4, zorder=3, label="moving average")
    if log:
        log_y(ax)
    step_limits(ax, span)
    return True


def step_limits(ax: Axes, span: tuple[int, int]) -> None:
    """Show steps ``span[0]`` to ``span[1]`` on the x axis, with a small margin for the markers."""
    margin = 0.015 * max(span[1] - span[0], 1)
    ax.set_xlim(span[0] - margin, span[1] + margin)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins="auto", integer=True))  # no ticks between steps in short runs


class ReadableLogLocator(ticker.Locator):
    """Log-axis ticks at 1, 2 and 5 times the powers of ten over short ranges, at powers of ten
    (every second, third, ... one over very long ranges) otherwise, and evenly spaced ones over a
    range too narrow to hold two of those (two gradient norms of 0.2155 and 0.2075 had no tick):
    never crowded, never empty."""

    def __call__(self) -> list[float]:
        low, high = self.axis.get_view_interval()
        return self.tick_values(low, high)

    def tick_values(self, vmin: float, vmax: float) -> list[float]:
        low, high = max(min(vmin, vmax), 1e-300), max(vmin, vmax, 1e-300)
        decades = math.log10(high / low)
        subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        stride = max(1, math.ceil(decades / 6))
        exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        ticks = [sub * 10.0**exponent for exponent in exponents if exponent % stride == 0 for sub in subs]
        if sum(1 for tick in ticks if low <= tick <= high) < 2:
            return [tick for tick in ticker.MaxNLocator(nbins=4).tick_values(low, high) if tick > 0]
        return ticks

    def nonsingular(self, vmin: float, vmax: float) -> tuple[float, float]:
        """Widen a range of one value (or of a value and its rounding) to a factor of 3 each side:
        an axis of zero height cannot be drawn (matplotlib divides by it)."""
        low, high = min(vmin, vmax), max(vmin, vmax)
        if low > 0 and high <= low * (1 + 1e-9):
            return low / 3, high * 3
        return super().nonsingular(vmin, vmax)


class ReadableNumberFormatter(ticker.Formatter):
    """Tick labels as plain numbers with as many digits as tell the ticks apart (3 at least)."""

    def __call__(self, value: float, pos: int | None = None) -> str:
        return f"{value:.3g}"

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        # each pair of neighbours told apart down to the decimal place below their gap's first digit
        # (steps of 0.0025 need 0.2105); powers of ten need no more than the 3 digits
        needed = [math.floor(math.log10(max(abs(a), abs(b)))) - math.floor(math.log10(abs(b - a))) + 2 for a, b in zip(values, values[1:]) if a != b]
        digits = max([3, *needed])
        return [f"{value:.{digits}g}" for value in values]


def log_y(ax: Axes) -> None:
    """A log y axis labelled with plain numbers (see :class:`ReadableLogLocator`)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ReadableLogLocator())
    ax.yaxis.set_major_formatter(ReadableNumberFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.autoscale_view(scalex=False)  # again, with the locator's widening of a one-value range


def run_color(index: int) -> str:
    """The colour of the ``index``-th run in overlays."""
    return RUN_COLORS[index % len(RUN_COLORS)]


def run_line_style(index: int) -> str:
    """The line style of the ``index``-th run: solid for the first ten colours, then dashed,
    dotted and dash-dotted, so that runs past the tenth do not share a line with an earlier one."""
    return RUN_LINE_STYLES[index // len(RUN_COLORS) % len(RUN_LINE_STYLES)]


def column_background(figure: Figure, spec: object, title: str, color: tuple[float, float, float]) -> Axes:
    """A tinted background axes spanning ``spec`` with a group title (e.g. STEP SIZE)."""
    ax = figure.add_subplot(spec)
    ax.set_facecolor((*color, 0.22))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color((*color, 0.9))
        spine.set_linewidth(2)
    ax.set_title(title, fontsize=BASE_FONT_SIZE + 5, fontweight="bold", color=tuple(0.6 * c for c in color))
    ax.set_zorder(-1)
    return ax
