"""``cockpit quantities``: every quantity with what it needs and which presets hold it."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


def quantity_rows() -> list[dict[str, Any]]:
    """Return one plain row per quantity, in alphabetical order."""
    from cockpit_cli.instruments import PRESETS, QUANTITIES

    rows = []
    for name in sorted(QUANTITIES):
        cls = QUANTITIES[name]
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        summary = doc[0].split(":", 1)[-1].strip() if doc else ""
        rows.append(
            {
                "name": name,
                "summary": summary,
                "per_sample": cls.per_sample,
                "curvature": cls.needs_curvature,
                "plain_sgd_only": cls.plain_sgd_only,
                "presets": [preset for preset, names in PRESETS.items() if name in names],
                "options": dict(cls.options_defaults),
            }
        )
    return rows


def presets_label(presets: list[str]) -> str:
    """``economy+`` for a quantity in economy and every larger preset (they nest), else the names."""
    nested = ["economy", "business", "full"]
    for start, preset in enumerate(nested[:-1]):
        if presets == nested[start:]:
            return f"{preset}+"
    return ", ".join(presets) or "-"


def render_quantity_table(rows: list[dict[str, Any]]) -> Group:
    """Render the rows as a Rich table, with a line that reads its presets column."""
    table = Table(title="quantities", title_justify="left", pad_edge=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("needs", no_wrap=True)
    table.add_column("presets", no_wrap=True)
    table.add_column("what it measures", overflow="fold", ratio=1)
    for row in rows:
        needs = ", ".join(n for n, on in (("per-sample", row["per_sample"]), ("curvature", row["curvature"]), ("plain SGD", row["plain_sgd_only"])) if on)
        table.add_row(row["name"], needs or "-", presets_label(row["presets"]), row["summary"])
    footer = Text("economy+: economy, business and full; business+: business and full; -: add it under instruments.quantities", style="dim")
    return Group(table, footer)
