"""Figures of a run (cockpit, layers, samples) and of several runs overlaid (matplotlib; no torch).

:func:`write_report` is imported on first use, so reading :func:`parse_step_range` or the data
helpers does not load matplotlib.
"""

from __future__ import annotations

from typing import Any

from cockpit_cli.report.data import parse_step_range

__all__ = ["parse_step_range", "write_report"]


def __getattr__(name: str) -> Any:
    if name == "write_report":
        from cockpit_cli.report.writer import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
