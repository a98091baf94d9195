"""STEP SIZE: the norm of the mini-batch gradient over all parameters."""

from __future__ import annotations

from rich.console import RenderableType

from cockpit_cli.display.panels.common import empty, frame, trend_table
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import DashboardState


def grad_norm(state: DashboardState) -> RenderableType:
    """The total gradient norm ‖g‖ and its history (log scale)."""
    series = state.get("GradNorm")
    if not len(series):
        body = empty(state.info.tracked, state.info.unavailable, "GradNorm")
        return frame(body, "GradNorm", "step size")
    return frame(trend_table([("‖g‖", series.last(), Sparkline(series.history(), style="blue", log=True))]), "GradNorm", "step size")
