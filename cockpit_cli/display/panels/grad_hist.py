"""GRADIENTS: the histogram of all per-sample gradient elements (log-scaled counts)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, WATCH, empty, frame, num
from cockpit_cli.display.sparkline import column_bars
from cockpit_cli.display.state import DashboardState

ROWS = 4


def clamp_style(fraction: float) -> str:
    """Red when over 1% of the elements fall outside the range, yellow over 0.1%."""
    return f"bold {ACT}" if fraction > 0.01 else WATCH if fraction > 0.001 else "dim"


class HistogramBars:
    """Vertical bars of a histogram whose two edge bins hold the clamped values; fits its width.

    Args:
        counts: Bin counts, the first and last bins including everything outside the range.
        low: Lower end of the range.
        high: Upper end of the range.
    """

    def __init__(self, counts: list[int], low: float, high: float):
        self.counts, self.low, self.high = counts, low, high

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(12, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        inner = self.counts[1:-1]
        per_char = max(1, math.ceil(len(inner) / max(options.max_width - 4, 1)))
        groups = [sum(inner[i : i + per_char]) for i in range(0, len(inner), per_char)]
        cells = [self.counts[0], *groups, self.counts[-1]]
        peak = math.log1p(max(cells) or 1)
        heights = [max(math.log1p(c) / peak, 1 / (8 * ROWS)) if c else 0.0 for c in cells]
        total = sum(self.counts) or 1
        edge_style = clamp_style((self.counts[0] + self.counts[-1]) / total)
        for line in column_bars(heights, ROWS):
            text = Text(no_wrap=True)
            text.append(line[0], style=edge_style)
            text.append(line[1:-1], style="magenta")
            text.append(line[-1], style=edge_style)
            yield text
        width = len(cells)
        middle = width // 2
        left, right = f"◂{self.low:g}", f"{self.high:g}▸"
        yield Text(left.ljust(middle) + "0" + right.rjust(width - middle - 1), style="dim", no_wrap=True)


def grad_hist(state: DashboardState) -> RenderableType:
    """The latest GradHist1d as log-scaled bars, with the clamped edge bins and their share."""
    hist: Any = state.latest.get("GradHist1d")
    if not isinstance(hist, dict) or not hist.get("counts"):
        return frame(empty(state.info.tracked, state.info.unavailable, "GradHist1d"), "Gradient elements", "gradients")
    counts = [int(c) for c in hist["counts"]]
    low, high = (hist.get("range") or (-2.0, 2.0))[:2]
    total = sum(counts) or 1
    clamped = counts[0] + counts[-1]
    body = Group(
        HistogramBars(counts, float(low), float(high)),
        Text.assemble(
            ("◂▸ clamped ", "dim"),
            (f"{num(100 * clamped / total, 2)}%", clamp_style(clamped / total)),
            (f" of {num(total)}", "dim"),
        )
    )
    step = state.latest_step.get("GradHist1d")
    return frame(body, "Gradient elements", "gradients", subtitle=f"[dim]log counts · step {step}[/]")
