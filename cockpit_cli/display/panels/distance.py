"""STEP SIZE: how far the parameters moved from the start (Distance) and per step (UpdateSize)."""

from __future__ import annotations

from rich.console import RenderableType

from cockpit_cli.display.panels.common import empty, frame, trend_table
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import DashboardState


def distance(state: DashboardState) -> RenderableType:
    """Total ‖θ_t − θ_0‖ and ‖θ_{t+1} − θ_t‖ over all parameters, with their histories."""
    rows = []
    for name, label, style in (("Distance", "distance", "blue"), ("UpdateSize", "update", "bright_blue")):
        series = state.get(name)
        if len(series):
            rows.append((label, series.last(), Sparkline(series.history(), style=style)))
    if not rows:
        body = empty(state.info.tracked, state.info.unavailable, "Distance")
        return frame(body, "Distance · UpdateSize", "step size")
    return frame(trend_table(rows), "Distance · UpdateSize", "step size")
