"""HYPERPARAMETERS: the learning rate over time (and the fixed batch size)."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text

from cockpit_cli.display.panels.common import frame, num, trend_table
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import DashboardState


def hyperparameters(state: DashboardState) -> RenderableType:
    """The current learning rate(s) with the history of the first group's, and the batch size."""
    series = state.get("lr")
    rates = ", ".join(num(rate) for rate in state.lr) or "-"
    rows = [("lr", Text(rates, style="bold"), Sparkline(series.history(), style="bright_black") if len(series) else Text("·", style="dim"))]
    rows.append(("batch", Text(state.info.batch_text) if state.info.batch_size else None, Text("")))
    return frame(trend_table(rows), "Hyperparameters", "bottom")
