"""``cockpit problems``: the table of registered problems."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


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


def render_problem_table(rows: list[dict[str, Any]], width: int = 160) -> Group:
    """Render the rows as a Rich table, with the BatchNorm problems named below it.

    Args:
        rows: From :func:`problem_rows`.
        width: Terminal width; below 110 columns the model column is left out.
    """
    with_model = width >= 110
    table = Table(title="problems", title_justify="left", show_lines=False, pad_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("data set", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("batch", justify="right", no_wrap=True)
    table.add_column("epochs", justify="right", no_wrap=True)
    table.add_column("L2", justify="right", no_wrap=True)
    if with_model:
        table.add_column("model", overflow="fold", ratio=1)
    for row in rows:
        table.add_row(
            row["name"] + (" [yellow]BN[/]" if row["batchnorm"] else ""),
            row["dataset"] + ("" if row["needs_data_files"] else "*"),
            f"{row['parameters']:,}" if row["parameters"] is not None else "-",
            str(row["batch_size"] or "-"),
            str(row["epochs"] or "-"),
            f"{row['weight_decay']:g}",
            *([row["model"]] if with_model else []),
        )
    batchnorm = [row["name"] for row in rows if row["batchnorm"]]
    footer = Text.from_markup(
        "* generated locally, no download needed; the others read data_dir (problem.download: true fetches them)\n"
        f"[yellow]BN[/] has BatchNorm, so per-sample instruments are unavailable: {', '.join(batchnorm) or 'none'}\n"
        "batch / epochs are DeepOBS's defaults where it has them; `cockpit problems --json` gives models, options and notes"
    )
    return Group(table, footer)
