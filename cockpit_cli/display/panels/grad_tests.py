"""GRADIENTS: the norm, inner-product and orthogonality tests against their threshold 1."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text

from cockpit_cli.display.panels.common import empty, frame, num, ok_or
from cockpit_cli.display.panels.rows import Rows
from cockpit_cli.display.sparkline import Sparkline, gauge
from cockpit_cli.display.state import DashboardState

TESTS = (("NormTest", "norm"), ("InnerTest", "inner"), ("OrthoTest", "ortho"))
GAUGE_WIDTH = 13


def grad_tests(state: DashboardState) -> RenderableType:
    """Each test's latest value, a log-scale gauge from 0.1 to 10 with 1 marked, and its history.

    A value above 1 means the mini-batch is too small for the gradient noise (the test fails).
    """
    rows = []
    for name, label in TESTS:
        series = state.get(name)
        if len(series):
            value = series.last()
            rows.append([label, Text(num(value, 2), style=ok_or(value, (0, 1), (1, 3))), gauge(value, GAUGE_WIDTH), Sparkline(series.history(), style="magenta", log=True)])
    if not rows:
        return frame(empty(state.info.tracked, state.info.unavailable, "NormTest"), "Gradient tests", "gradients")
    return frame(Rows(rows, ["left", "right", "left", "left"], flex=3, styles=["dim", "", "", ""]), "Gradient tests", "gradients", subtitle="[dim]>1: batch too small[/]")
