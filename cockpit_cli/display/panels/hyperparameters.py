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
    info = state.info
    micro_batches = Text(f"{info.micro_batches} micro-batches", style="bright_black") if info.micro_batches > 1 else Text("")
    rows.append(("batch", info.batch_size or None, micro_batches))
    return frame(trend_table(rows), "Hyperparameters", "bottom")
