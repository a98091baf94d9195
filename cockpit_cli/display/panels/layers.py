"""GRADIENTS: per-layer table of gradient and weight norms, relative updates and dead fractions."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import RenderableType
from rich.text import Text

from cockpit_cli.display.panels.common import ACT, GOOD, WATCH, empty, frame, num
from cockpit_cli.display.panels.rows import Rows
from cockpit_cli.display.state import DashboardState

SEVERITY = {GOOD: 0, "dim": 0, WATCH: 1, ACT: 2}


def activation_zero_fractions(parameters: list[str], activations: dict[str, Any]) -> dict[str, float]:
    """For each module owning parameters, the largest zero fraction among the outputs it feeds.

    That is its own output and those of the parameter-free modules (e.g. a ReLU) that follow it
    before the next module with parameters.
    """
    owners = list(dict.fromkeys(name.rpartition(".")[0] for name in parameters))
    result: dict[str, float] = {}
    current: str | None = None
    for key, stats in activations.items():
        if key in owners:
            current = key
        if current is not None and isinstance(stats, dict) and isinstance(stats.get("zero_fraction"), (int, float)):
            result[current] = max(result.get(current, 0.0), float(stats["zero_fraction"]))
    return result


def grad_style(value: float | None, median: float | None) -> str:
    """Red when a layer's gradient norm is over 100x or under 1/100 of the median layer's."""
    if value is None or not median:
        return "dim" if value is None else GOOD
    if value != value or value > 100 * median or value < median / 100:
        return ACT
    return GOOD if 0.1 * median <= value <= 10 * median else WATCH


def ratio_style(value: float | None) -> str:
    """Update / weight ratio: fine within [1e-5, 1e-1], watch within [1e-6, 1], else act."""
    if value is None:
        return "dim"
    return GOOD if 1e-5 <= value <= 1e-1 else WATCH if 1e-6 <= value <= 1 else ACT


def fraction_style(value: float | None, watch: float, act: float) -> str:
    if value is None:
        return "dim"
    return ACT if value > act else WATCH if value > watch else GOOD


def order(value: float | None) -> str:
    """One significant digit in scientific notation: ``8e-3`` (ratios compare by magnitude)."""
    if value is None or value != value:
        return "-" if value is None else "nan"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _at(values: Any, index: int) -> float | None:
    return float(values[index]) if isinstance(values, list) and index < len(values) and values[index] is not None else None


def layers(state: DashboardState, limit: int = 10) -> RenderableType:
    """One row per parameter (flagged rows first when there are more than ``limit``)."""
    stats = state.latest.get("LayerStats")
    names = state.info.parameters
    if not isinstance(stats, dict) or not names:
        return frame(empty(state.info.tracked, state.info.unavailable, "LayerStats"), "Layers", "gradients")
    grads = [g for g in (_at(stats.get("grad_norm"), i) for i in range(len(names))) if g is not None]
    median = statistics.median(grads) if grads else None
    dead = activation_zero_fractions(names, state.latest.get("Activations") or {})
    rows = []
    for index, name in enumerate(names):
        grad, weight = _at(stats.get("grad_norm"), index), _at(stats.get("weight_norm"), index)
        ratio, zero = _at(stats.get("update_ratio"), index), _at(stats.get("zero_grad_fraction"), index)
        act = dead.get(name.rpartition(".")[0]) if name.endswith("weight") else None
        zero_style = "dim" if name in state.info.lookup_tables else fraction_style(zero, 0.2, 0.5)  # an embedding's rows outside the batch: zero by construction
        styles = [grad_style(grad, median), ratio_style(ratio), zero_style, fraction_style(act, 0.5, 0.9)]
        worst = max(styles, key=lambda style: SEVERITY.get(style, 0))
        cells = [Text(num(grad, 2), style=styles[0]), Text(num(weight, 2)), Text(order(ratio), style=styles[1])]
        cells += [Text(percent(zero), style=styles[2]), Text(percent(act), style=styles[3])]
        name_style = "bold red" if worst == ACT else ("yellow" if worst == WATCH else "")
        rows.append((SEVERITY.get(worst, 0), index, [Text(name, style=name_style), *cells]))
    shown = rows if len(rows) <= limit else sorted(sorted(rows, key=lambda r: -r[0])[:limit], key=lambda r: r[1])
    table = Rows([cells for _, _, cells in shown], ["left"] + ["right"] * 5, flex=0, header=["layer", "‖g‖", "‖w‖", "Δ/w", "g=0", "a=0"])
    flagged = sum(1 for severity, _, _ in rows if severity)
    note = f"{len(rows) - len(shown)} more, " if len(shown) < len(rows) else ""
    subtitle = f"[dim]{note}{flagged} flagged · step {state.latest_step.get('LayerStats')}[/]"
    return frame(table, "Layers", "gradients", subtitle=subtitle)
