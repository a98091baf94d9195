"""The header: what is trained with what, how far it is, how fast it goes."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, GOOD, WATCH, duration, num
from cockpit_cli.display.panels.rows import Rows
from cockpit_cli.display.state import DashboardState

STATUS_STYLE = {"running": "bold cyan", "waiting": "dim", "completed": f"bold {GOOD}", "interrupted": f"bold {WATCH}"}


class ProgressLine:
    """A progress bar drawn in the width of its cell: cyan while running, green when complete."""

    def __init__(self, fraction: float):
        self.fraction = min(max(fraction, 0.0), 1.0)

    def line(self, width: int) -> Text:
        """The bar in ``width`` characters."""
        filled = round(self.fraction * width)
        return Text.assemble(("━" * filled, GOOD if filled == width else "cyan"), ("━" * (width - filled), "bright_black"))


def steps_per_second(state: DashboardState, window: int = 50) -> float | None:
    """Training speed over the last ``window`` recorded steps (``None`` until two are known)."""
    times = state.get("time")
    if len(times.values) < 2:
        return None
    first = max(len(times.values) - window, 0)
    seconds = times.values[-1] - times.values[first]
    return (times.steps[-1] - times.steps[first]) / seconds if seconds > 0 else None


def header(state: DashboardState, narrow: bool = False) -> RenderableType:
    """Problem, optimizer, learning rate, progress, epoch, speed, elapsed and remaining time.

    Args:
        state: The run.
        narrow: Put the speed and times on a line of their own, below the progress bar.
    """
    info = state.info
    done = state.step + 1
    total = max(info.total_steps, done, 1)
    epochs = math.ceil(info.total_steps / info.steps_per_epoch) if info.steps_per_epoch else None
    rate = steps_per_second(state)
    remaining = (total - done) / rate if rate and state.status == "running" else None
    lr = ", ".join(num(rate_, 3) for rate_ in state.lr) or "-"

    facts = Text.assemble(
        (info.problem, "bold"),
        f" · {info.num_parameters:,} parameters · batch {info.batch_text} · {info.device} · lr ",
        (lr, "bold"),
    )
    status = Text(state.status, style=STATUS_STYLE.get(state.status, f"bold {ACT}"))
    stats = Text(
        f"epoch {state.epoch}{f'/{epochs}' if epochs else ''}  {num(rate, 3) if rate else '-'} steps/s  "
        f"elapsed {duration(state.elapsed)}  remaining {duration(remaining) if remaining is not None else '-'}"
    )
    percent = Text(f"{100 * done / total:3.0f}%")
    bar_line = [Text(f"step {done}/{info.total_steps}", style="bold"), ProgressLine(done / total), percent if narrow else percent + "  " + stats]
    lines = [Rows([[facts, status]], ["left", "right"], flex=0), Rows([bar_line], ["left", "left", "left"], flex=1)]
    body = Group(*lines, stats) if narrow else Group(*lines)
    title = f"[bold]Cockpit for {info.optimizer}[/]"
    if info.run_dir:
        return Panel(body, title=title, title_align="left", subtitle=f"[dim]{info.run_dir}[/]", subtitle_align="right", border_style="bright_black", padding=(0, 1))
    return Panel(body, title=title, title_align="left", border_style="bright_black", padding=(0, 1))
