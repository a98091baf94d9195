"""Writes a run's figures: ``cockpit.png``, ``layers.png`` and ``samples.png``."""

from __future__ import annotations

from pathlib import Path

from cockpit_cli.report.cockpit_figure import write_cockpit_figure
from cockpit_cli.report.data import RunView
from cockpit_cli.report.layers_figure import write_layers_figure
from cockpit_cli.report.samples_figure import write_samples_figure
from cockpit_cli.storage.reader import RunData

FIGURES = (("cockpit.png", write_cockpit_figure), ("layers.png", write_layers_figure), ("samples.png", write_samples_figure))


def write_report(run: RunData, out_dir: Path, step_range: tuple[int, int] | None = None) -> list[Path]:
    """Write the figures of ``run`` into ``out_dir``.

    Args:
        run: A run read by :func:`cockpit_cli.storage.reader.read_run`.
        out_dir: Directory for the PNG files (created if missing).
        step_range: First and last step every figure shows (``None``: the whole run).

    Returns:
        The paths written, in the order cockpit, layers, samples.

    Raises:
        CockpitError: ``step_range`` holds none of the run's steps.
    """
    view = RunView(run, step_range)
    view.check_range()
    out_dir = Path(out_dir)
    return [write(view, out_dir / name) for name, write in FIGURES]
