"""``cockpit problems``: the table of registered problems."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def problem_rows() -> list[dict[str, Any]]:
    """Return one plain row per registered problem, in registration order."""
    from problems import PROBLEMS

    rows = []
    for name, entry in PROBLEMS.items():
        info = entry.info
        rows.append(
            {
                "name": name,
                "dataset": info.dataset,
                "model": info.model,
                "parameters": info.parameters,
                "batch_size": info.batch_size,
                "epochs": info.epochs,
                "weight_decay": info.weight_decay,
                "batchnorm": info.has_batchnorm,
                "needs_data_files": info.downloads,
                "options": sorted(entry.option_defaults()),
                "notes": info.notes,
            }
        )
    return rows


def render_problem_table(rows: list[dict[str, Any]]) -> Table:
    """Render the rows as a Rich table."""
    table = Table(title="problems", title_justify="left", show_lines=False)
    for column, justify in [("name", "left"), ("data set", "left"), ("model", "left"), ("parameters", "right"),
                            ("batch", "right"), ("epochs", "right"), ("weight decay", "right"), ("notes", "left")]:
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        notes = ("[yellow]BatchNorm: no exact per-sample gradients[/]; " if row["batchnorm"] else "") + row["notes"]
        table.add_row(
            row["name"],
            row["dataset"] + ("" if row["needs_data_files"] else " (generated)"),
            row["model"],
            f"{row['parameters']:,}" if row["parameters"] is not None else "-",
            str(row["batch_size"] or "-"),
            str(row["epochs"] or "-"),
            f"{row['weight_decay']:g}",
            notes.rstrip("; "),
        )
    return table
