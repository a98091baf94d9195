"""ALERTS: what needs attention now, most severe first (fed by the state's simple checks and,
later, by a diagnosis engine through ``DashboardState.add_alert``)."""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cockpit_cli.display.panels.common import GOOD, SEVERITY_STYLE
from cockpit_cli.display.state import DashboardState

ICON = {"info": "●", "warning": "▲", "critical": "✖"}


def alerts(state: DashboardState, limit: int = 5) -> RenderableType:
    """The alerts, each with a coloured severity mark; a green all-clear when there are none."""
    items = state.alert_list()
    if not items:
        body: Table | Text = Text("✔ nothing to report", style=GOOD)
        border = GOOD
    else:
        body = Table.grid(padding=(0, 1))
        body.add_column(no_wrap=True)
        body.add_column(ratio=1)
        for severity, text in items[:limit]:
            body.add_row(Text(ICON.get(severity, "●"), style=SEVERITY_STYLE.get(severity, "")), Text(text))
        if len(items) > limit:
            body.add_row("", Text(f"and {len(items) - limit} more", style="dim"))
        border = SEVERITY_STYLE.get(items[0][0], GOOD)
    return Panel(body, title="[bold]Alerts[/]", title_align="left", border_style=border, box=box.ROUNDED, padding=(0, 1))
