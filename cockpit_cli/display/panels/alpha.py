"""STEP SIZE: the local step size Alpha, its distribution against the ideal 0, and its history."""

from __future__ import annotations

import math

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, GOOD, WATCH, empty, frame, num, ok_or
from cockpit_cli.display.panels.rows import Rows
from cockpit_cli.display.sparkline import LEVELS, TAIL, Sparkline
from cockpit_cli.display.state import ALPHA_BINS, ALPHA_RANGE, DashboardState, sorted_median
from cockpit_cli.recent import recent_count, recent_label

# Colours of a median Alpha: green within the first range, yellow within the second, else red
# (a median, as in the figure and the diagnosis: one wild step would move a mean far).
ALPHA_OK = ((-0.5, 0.5), (-0.85, 0.85))


def bin_counts(values: list[float]) -> list[int]:
    """Histogram of ``values`` over ALPHA_RANGE in ALPHA_BINS bins (outside: edge bins)."""
    low, high = ALPHA_RANGE
    counts = [0] * ALPHA_BINS
    for value in values:
        if math.isfinite(value):
            counts[min(max(int((value - low) / (high - low) * ALPHA_BINS), 0), ALPHA_BINS - 1)] += 1
    return counts


def bin_style(index: int) -> str:
    """Green near 0, yellow further out, red near -1 (no progress) or +1 and beyond (overshoot)."""
    low, high = ALPHA_RANGE
    centre = low + (index + 0.5) * (high - low) / ALPHA_BINS
    style = GOOD if abs(centre) < 0.5 else WATCH if abs(centre) < 0.9 else ACT
    return f"bold underline {style}" if abs(centre) < 1e-9 else style


class AlphaHistograms:
    """Both Alpha histograms with the axis below; each bin gets 1 to 3 characters, as fits.

    Args:
        rows: ``(label, counts)`` per histogram line.
    """

    def __init__(self, rows: list[tuple[str, list[int]]]):
        self.rows = rows

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(ALPHA_BINS + 10, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        per_bin = min(max((options.max_width - 10) // ALPHA_BINS, 1), 3)
        for label, counts in self.rows:
            peak = max(counts) or 1
            text = Text(no_wrap=True, overflow="crop")
            for index, count in enumerate(counts):
                char = " " if count == 0 else LEVELS[max(1, round(count / peak * len(LEVELS))) - 1]
                text.append(char * per_bin, style=bin_style(index))
            text.append(f" {label}", style="dim")
            yield text
        width, middle = ALPHA_BINS * per_bin, (ALPHA_BINS // 2) * per_bin + per_bin // 2
        low, high = f"{ALPHA_RANGE[0]:g}", f"{ALPHA_RANGE[1]:g}"
        yield Text(low.ljust(middle) + "0" + high.rjust(width - middle - 1), style="dim", no_wrap=True, overflow="crop")


def alpha(state: DashboardState) -> RenderableType:
    """Alpha's distribution (all and the recent values) over [-1.5, 1.5], medians, and its history."""
    series = state.get("Alpha")
    if not len(series):
        body: RenderableType = empty(state.info.tracked, state.info.unavailable, "Alpha")
        return frame(body, "Alpha", "step size")
    window = recent_count(len(series))
    label = recent_label(len(series)) if window <= TAIL else f"last {TAIL}"
    recent = [v for v in series.tail(min(window, TAIL)) if math.isfinite(v)]
    median, recent_median = state.alpha_median, sorted_median(sorted(recent))
    histograms = AlphaHistograms([("all", state.alpha_counts), (label, bin_counts(recent))])
    medians = Rows(
        [
            [Text("median (all)", style="dim"), Text(num(median, 2), style=ok_or(median, *ALPHA_OK))],
            [Text(f"median ({label})", style="dim"), Text(num(recent_median, 2), style=ok_or(recent_median, *ALPHA_OK))],
        ],
        ["left", "right"],
    )
    body = Group(histograms, medians, Sparkline(series.history(), style="blue", clip=ALPHA_RANGE))
    return frame(body, "Alpha", "step size", subtitle=f"[dim]ideal 0 · n={len(series)}[/]")
