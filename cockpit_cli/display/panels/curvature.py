"""CURVATURE: the largest Hessian eigenvalue, the Hessian trace and the TIC, when tracked."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, GOOD, WATCH, empty, frame, num, trend_table
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import DashboardState


def _body(state: DashboardState, name: str, label: str, log: bool) -> tuple[RenderableType, bool]:
    """The latest value and history of ``name``, and whether there is any."""
    series = state.get(name)
    if not len(series):
        return empty(state.info.tracked, state.info.unavailable, name), False
    positive = all(v > 0 for v in series.history())
    return trend_table([(label, series.last(), Sparkline(series.history(), style="cyan", log=log and positive))]), True


def hess_max_ev(state: DashboardState) -> RenderableType:
    """λ_max with its history (log scale) and lr·λ_max, which exceeds 2 where plain GD is unstable."""
    body, filled = _body(state, "HessMaxEV", "λmax", log=True)
    if filled and state.lr:
        value = state.get("HessMaxEV").last() or 0.0
        product = state.lr[0] * value
        style = GOOD if product < 1 else WATCH if product <= 2 else f"bold {ACT}"
        body = Group(body, Text.assemble(("lr·λmax ", "dim"), (num(product), style), (" (>2: unstable for GD)", "dim")))
    return frame(body, "Hessian max eigenvalue", "curvature")


def hess_trace(state: DashboardState) -> RenderableType:
    """The trace of the Hessian (or its GGN approximation, as the run's title says), summed over parameters."""
    body, _ = _body(state, "HessTrace", "trace", log=True)
    return frame(body, state.info.trace_title, "curvature")


def tic(state: DashboardState) -> RenderableType:
    """Takeuchi's information criterion with a diagonal curvature approximation."""
    body, _ = _body(state, "TICDiag", "TIC", log=True)
    return frame(body, "TIC (diagonal)", "curvature")
