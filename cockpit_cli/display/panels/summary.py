"""The static summary left in the terminal when a run ends: where, how it went, what next."""

from __future__ import annotations

import math

from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, GOOD, WATCH, num, total_time
from cockpit_cli.display.panels.performance import SPLITS, best_valid, metric
from cockpit_cli.display.state import DashboardState

BORDER = {"completed": GOOD, "interrupted": WATCH}


def summary(state: DashboardState, run_dir: str | None = None) -> RenderableType:
    """Status, steps and time, the final evaluation, the best valid one, and the next command."""
    run_dir = run_dir or state.info.run_dir
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    status = f"{state.status} after {state.step + 1} of {state.info.total_steps} steps in {total_time(state.time)}"
    grid.add_row("run", Text(status, style=BORDER.get(state.status, ACT)))
    if state.message:
        grid.add_row("", Text(state.message))
    if state.evals:
        final = state.evals[-1]
        parts = [Text.assemble((f"{split} ", "dim"), metric(final["splits"].get(split)), "  ") for split in SPLITS if split in final["splits"]]
        grid.add_row("final", Text.assemble(*parts))
        best = best_valid(state.evals)
        if best is not None:
            grid.add_row("best valid", Text.assemble(metric(best["splits"]["valid"]), (f" at step {best['step']}", "dim")))
    loss, ema = state.get("loss"), state.get("loss_ema")
    last = loss.last()
    if last is not None and not math.isfinite(last):  # the average of the finite ones is from before
        when = f"; {num(ema.last())} smoothed up to step {ema.steps[-1]}" if len(ema) else ""
        grid.add_row("mini-batch loss", Text(f"{num(last)} at the last step{when}", style=ACT))
    elif ema.last() is not None:
        grid.add_row("mini-batch loss", f"{num(ema.last())} (smoothed)")
    if run_dir:
        grid.add_row("results", Text(str(run_dir), style="bold"))
        grid.add_row("next", Text(f"cockpit diagnose {run_dir}", style="bold cyan"))
    alerts = [alert for alert in state.alert_list() if not (state.message and state.message in alert[1])]
    if alerts:
        grid.add_row("alerts", Text("; ".join(text for _, text in alerts[:3]), style=WATCH))
    return Panel(grid, title=f"[bold]Cockpit for {state.info.optimizer} · {state.info.problem}[/]", title_align="left", border_style=BORDER.get(state.status, ACT), expand=False)
