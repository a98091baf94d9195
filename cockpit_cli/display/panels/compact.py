"""The narrow-terminal view: one row per tracked instrument, its latest value and its history."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text

from cockpit_cli.display.panels.alpha import ALPHA_OK
from cockpit_cli.display.panels.common import frame, num, ok_or, trend_table
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import ALPHA_RANGE, DashboardState

# (series, label, colour ranges (good, watch) or None, log-scale history)
ROWS = (
    ("loss_ema", "loss (smoothed)", None, False),
    ("Alpha", "alpha", ALPHA_OK, False),  # drawn clipped to ALPHA_RANGE
    ("Distance", "distance", None, False),
    ("UpdateSize", "update size", None, False),
    ("GradNorm", "grad norm", None, True),
    ("NormTest", "norm test", ((0, 1), (1, 3)), True),
    ("InnerTest", "inner test", ((0, 1), (1, 3)), True),
    ("OrthoTest", "ortho test", ((0, 1), (1, 3)), True),
    ("HessMaxEV", "Hessian λmax", None, True),
    ("HessTrace", "Hessian trace", None, True),
    ("TICDiag", "TIC", None, True),
)
SKIP = {"loss", "lr", "time", "Loss", "Time"}


def compact(state: DashboardState) -> RenderableType:
    """Every scalar history in one table (known quantities first, then any others)."""
    known = {name for name, *_ in ROWS}
    extra = [(name, name, None, False) for name in state.series if name not in known and name not in SKIP]
    rows = []
    for name, label, ranges, log in (*ROWS, *extra):
        series = state.get(name)
        if not len(series):
            continue
        value = series.last()
        label = state.info.trace_title if name == "HessTrace" else label
        style = ok_or(value, *ranges) if ranges else ""
        positive = all(v > 0 for v in series.history())
        clip = ALPHA_RANGE if name == "Alpha" else None
        rows.append((label, Text(num(value), style=style), Sparkline(series.history(), style="cyan", log=log and positive, clip=clip)))
    if not rows:
        return frame(Text("waiting for the first step", style="dim"), "Instruments", "bottom")
    return frame(trend_table(rows), "Instruments", "bottom")
