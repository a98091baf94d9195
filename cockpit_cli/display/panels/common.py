"""What every panel shares: the colours and their meaning, number formatting, the panel frame."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.panel import Panel
from rich.text import Text

from cockpit_cli.display.panels.rows import Rows

GOOD, WATCH, ACT = "green", "yellow", "red"  # fine / keep an eye on it / do something
SEVERITY_STYLE = {"info": GOOD, "warning": WATCH, "critical": f"bold {ACT}"}
COLUMN_STYLE = {"step size": "blue", "gradients": "magenta", "curvature": "cyan", "bottom": "bright_black"}
# Which preset first tracks a quantity (for panels that stay empty).
PRESET_OF = {"HessTrace": "business", "TICDiag": "business", "HessMaxEV": "full", "GradHist2d": "full"}


def num(value: Any, digits: int = 3) -> str:
    """Format a number compactly: ``0.123``, ``1.2e-5``, ``12.3M`` (integers), ``nan``; ``-`` if missing."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(float(value))
    if isinstance(value, int):
        if abs(value) < 100_000:
            return str(value)
        for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:.{digits}g}{suffix}"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        text = f"{value:.{max(digits - 2, 0)}e}"
    else:
        text = f"{value:.{digits}g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")


def duration(seconds: float | None) -> str:
    """Format seconds as ``1:02:03`` or ``2:03``; ``-`` for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def total_time(seconds: float | None) -> str:
    """A finished run's time: ``4.2 s`` under a minute (a quick run's ``0:00`` says nothing), else as :func:`duration`."""
    if seconds is not None and 0 <= seconds < 60:
        return f"{seconds:.1f} s"
    return duration(seconds)


def frame(body: RenderableType, title: str, column: str, subtitle: str | None = None) -> Panel:
    """Wrap ``body`` in the panel frame of its dashboard column."""
    return Panel(
        body,
        title=f"[bold]{title}[/]",
        title_align="left",
        subtitle=subtitle,
        subtitle_align="right",
        border_style=COLUMN_STYLE.get(column, "bright_black"),
        box=box.ROUNDED,
        padding=(0, 1),
    )


def not_tracked(name: str, unavailable: dict[str, str]) -> Text:
    """The text of a panel whose quantity this run does not track."""
    if name in unavailable:
        return Text(f"unavailable: {unavailable[name]}", style="dim")
    preset = PRESET_OF.get(name)
    if preset:
        return Text(f"tracked with preset {preset}", style="dim")
    return Text(f"not tracked (instruments.quantities.{name}: true)", style="dim")


def ok_or(value: float | None, good: tuple[float, float], watch: tuple[float, float]) -> str:
    """Colour of ``value``: green inside ``good``, yellow inside ``watch``, red outside or not finite."""
    if value is None:
        return "dim"
    if not math.isfinite(value):
        return f"bold {ACT}"
    if good[0] <= value <= good[1]:
        return GOOD
    return WATCH if watch[0] <= value <= watch[1] else ACT


def trend_table(rows: list[tuple[str, Any, Any]]) -> RenderableType:
    """Rows of ``label  value  sparkline``; the sparkline takes the remaining width."""
    cells = [[label, value if isinstance(value, Text) else Text(num(value)), picture] for label, value, picture in rows]
    return Rows(cells, ["left", "right", "left"], flex=2, styles=["dim", "", ""])


def empty(tracked: list[str], unavailable: dict[str, str], name: str) -> Text:
    """What a panel says before its quantity has a value: waiting, or not tracked and why."""
    if name in tracked and name not in unavailable:
        return Text("waiting for the first tracked step", style="dim")
    return not_tracked(name, unavailable)
