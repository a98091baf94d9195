"""PERFORMANCE: the mini-batch loss with its moving average, and the evaluations."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from cockpit_cli.display.panels.common import GOOD, frame, num, trend_table
from cockpit_cli.display.panels.rows import Rows
from cockpit_cli.display.sparkline import Sparkline
from cockpit_cli.display.state import DashboardState

SPLITS = ("train_eval", "valid", "test")


def metric(split: dict[str, Any] | None) -> Text:
    """``loss  acc%`` of one split at one evaluation."""
    if not split:
        return Text("-", style="dim")
    accuracy = split.get("accuracy")
    return Text.assemble(num(split.get("loss")), (f" {100 * accuracy:.1f}%" if accuracy is not None else "", "bold"))


def best_valid(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the best validation accuracy (or lowest validation loss)."""
    scored = [e for e in evals if (e["splits"].get("valid") or {}).get("loss") is not None]
    if not scored:
        return None
    if any(e["splits"]["valid"].get("accuracy") is not None for e in scored):
        return max(scored, key=lambda e: e["splits"]["valid"].get("accuracy") or -1.0)
    return min(scored, key=lambda e: e["splits"]["valid"]["loss"])


def performance(state: DashboardState, evaluations: int = 3) -> RenderableType:
    """Loss and smoothed loss sparklines, validation accuracy at every evaluation, the last
    ``evaluations`` evaluations on every split and the best validation result."""
    loss, ema = state.get("loss"), state.get("loss_ema")
    rows = [
        ("loss", loss.last(), Sparkline(loss.history(), style="bright_black")),
        ("smoothed", ema.last(), Sparkline(ema.history(), style="bold white")),
    ]
    valid = [e["splits"]["valid"] for e in state.evals if e["splits"].get("valid")]
    accuracies = [v["accuracy"] for v in valid if v.get("accuracy") is not None]
    if accuracies:  # one point per evaluation
        rows.append(("valid acc", Text(f"{100 * accuracies[-1]:.1f}%"), Sparkline(accuracies, style="green")))
    elif valid:
        rows.append(("valid loss", valid[-1].get("loss"), Sparkline([float(v["loss"]) if v.get("loss") is not None else math.nan for v in valid], style="green")))
    parts: list[RenderableType] = [trend_table(rows)]
    best = best_valid(state.evals)
    if state.evals:
        table = []
        for record in state.evals[-evaluations:]:
            style = f"bold {GOOD}" if record is best else ""
            table.append([Text(str(record["step"]), style=style), *(metric(record["splits"].get(split)) for split in SPLITS)])
        parts.append(Rows(table, ["right"] * 4, header=["step", *SPLITS], gap=2))
    if best is not None:
        top = best["splits"]["valid"]
        accuracy = f"{100 * top['accuracy']:.1f}% " if top.get("accuracy") is not None else ""
        parts.append(Text.assemble(("best valid ", "dim"), (f"{accuracy}(loss {num(top['loss'])})", GOOD), (f" at step {best['step']}", "dim")))
    return frame(Group(*parts), "Performance", "bottom")
