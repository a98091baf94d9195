"""Presenting a :class:`~cockpit_cli.compare.Comparison`: Rich text, versioned JSON, and the
``cockpit compare`` command that prints one of them and optionally writes the overlay plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cockpit_cli.compare import COMPARE_SCHEMA_VERSION, UNSET, Comparison, Findings, Row, compare_loaded, load_runs
from cockpit_cli.errors import ExitCode


def _number(value: float) -> str:
    magnitude = abs(value)
    if value != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


def format_value(value: Any, kind: str) -> str:
    """Format one compared value; ``-`` for a missing one, ``nan`` or ``inf`` for a non-finite one
    (a diverged run's final loss: it was evaluated)."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "percent":
        return f"{100 * value:.2f}%"
    if kind == "seconds":
        return f"{1000 * value:.3g} ms" if abs(value) < 1 else f"{value:.1f} s"
    if kind == "trend":
        return f"{_number(value[0])} → {_number(value[1])}"
    if kind == "text" or not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value) if not isinstance(value, (dict, list)) else json.dumps(value)
    return str(value) if kind == "integer" else _number(float(value))


def _best_index(row: Row) -> int | None:
    """Index of the best value of a row with a direction (``None`` without one or with one value)."""
    present = [(value, index) for index, value in enumerate(row.values) if isinstance(value, (int, float)) and math.isfinite(value)]
    if row.better is None or len(present) < 2 or len({value for value, _ in present}) < 2:
        return None
    return (max if row.better == "higher" else min)(present, key=lambda pair: pair[0])[1]


def _table(title: str, first: str, names: Sequence[str], rows: Sequence[tuple[str, list[str], int | None]]) -> Group:
    """A heading over a table with one column per run; each row's best cell starred in green."""
    table = Table(pad_edge=False, show_edge=False)
    table.add_column(first, no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for label, cells, best in rows:
        table.add_row(label, *[Text(f"{cell} *", style="bold green") if index == best else Text(cell) for index, cell in enumerate(cells)])
    return Group(Text(""), Text(title, style="bold"), table)


def render_text(comparison: Comparison) -> RenderableType:
    """The comparison as Rich renderables: runs, config differences, outcome, instruments, verdict."""
    names = [run["name"] for run in comparison.runs]
    parts: list[RenderableType] = [Text(f"Comparing {len(names)} runs", style="bold")]
    for run in comparison.runs:
        parts.append(Text(f"  {run['name']}: {run['problem']} with {run['optimizer']}, {run['status']} ({run['path']})"))
    if comparison.config_differences:
        rows = [(key, [format_value(value, "text") for value in values], None) for key, values in comparison.config_differences.items()]
        parts.append(_table("Config differences (output.name ignored)", "key", names, rows))
    else:
        parts.append(Text("\nConfig differences: none (output.name ignored)", style="bold"))
    for title, table_rows in (("Outcome (* best)", comparison.outcomes), ("Instruments", comparison.instruments)):
        if table_rows:
            parts.append(_table(title, "metric", names, [(row.label, [format_value(value, row.kind) for value in row.values], _best_index(row)) for row in table_rows]))
    if not comparison.instruments:
        parts.append(Text("\nInstruments: no run tracked any (instruments.preset: none)", style="bold"))
    if comparison.findings is not None:
        parts.append(Text("\nDiagnosis (top findings)", style="bold"))
        for name, findings in zip(names, comparison.findings):
            parts.append(Text(f"  {name}: {'' if findings else 'no findings'}"))
            parts.extend(Text(f"    [{item.get('severity', '?')}] {item.get('rule', '?')}: {item.get('meaning', '')}") for item in findings)
    parts.append(_verdict(comparison, names))
    if comparison.notes:
        parts.append(Text("\nNotes", style="bold"))
        parts.extend(Text(f"  - {note}", style="yellow") for note in comparison.notes)
    return Group(*parts)


def _verdict(comparison: Comparison, names: Sequence[str]) -> Text:
    """One line saying which run did better, with every run's value."""
    ranking = comparison.ranking
    if ranking is None or ranking.winner is None:
        return Text("\nBetter: undecided (see the notes)", style="bold")
    kind = "percent" if ranking.metric.endswith("accuracy") else "number"
    best = "highest" if ranking.direction == "higher" else "lowest"
    values = ", ".join(f"{name} {format_value(value, kind)}" for name, value in zip(names, ranking.values))
    return Text.assemble(("\nBetter: ", "bold"), (names[ranking.winner], "bold green"), f" on {ranking.metric.replace('.', ' ')}, {best} over the evaluations ({values})")


def _plain(value: Any) -> Any:
    """JSON-safe copy of ``value``: non-finite floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    """The comparison as a JSON-ready mapping with ``schema_version``."""
    ranking = comparison.ranking
    return _plain(
        {
            "schema_version": COMPARE_SCHEMA_VERSION,
            "runs": comparison.runs,
            "config_differences": [{"key": key, "values": [None if value == UNSET else value for value in values]} for key, values in comparison.config_differences.items()],
            "outcomes": [asdict(row) for row in comparison.outcomes],
            "instruments": [asdict(row) for row in comparison.instruments],
            "ranking": None if ranking is None else {**asdict(ranking), "winner": None if ranking.winner is None else comparison.runs[ranking.winner]["name"]},
            "findings": None if comparison.findings is None else {run["name"]: items for run, items in zip(comparison.runs, comparison.findings)},
            "notes": comparison.notes,
        }
    )


def run_compare(paths: Sequence[Path], metrics: Sequence[str], as_json: bool, plot: Path | None, console: Console, findings: Findings | None = None) -> int:
    """Compare the runs named by ``paths``, print the result on ``console``, optionally plot it.

    Args:
        paths: Run directories, directories holding runs, or glob patterns (two runs or more).
        metrics: ``--metric`` values: scalar quantities or evaluation metrics (``valid.loss``).
        as_json: Print the versioned JSON structure instead of text.
        plot: Write the overlay PNG here (``None``: no plot).
        console: Where the result goes.
        findings: A run's diagnosis findings as dicts (see :func:`cockpit_cli.compare.compare_runs`).

    Returns:
        ``ExitCode.OK``.

    Raises:
        CockpitError: Bad paths, fewer than two runs, or an unknown metric.
    """
    runs, skipped = load_runs(paths)
    comparison = compare_loaded(runs, metrics, findings, skipped)
    if plot is not None:
        from cockpit_cli.report.compare_figure import write_compare_figure

        write_compare_figure(runs, list(metrics), Path(plot))
    if as_json:
        console.print(json.dumps(comparison_to_dict(comparison), indent=2), markup=False, highlight=False, soft_wrap=True, emoji=False)
    else:
        console.print(render_text(comparison))
        if plot is not None:
            console.print(f"plot written to {plot}", highlight=False, soft_wrap=True)
    return int(ExitCode.OK)
