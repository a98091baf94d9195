"""The ``cockpit report RUN_DIR`` command: write the run's figures and say where they went."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cockpit_cli.errors import ExitCode
from cockpit_cli.report.data import parse_step_range
from cockpit_cli.report.writer import write_report
from cockpit_cli.storage.reader import read_run


def run_report(run_dir: Path, out: Path | None, step_range: str | None, console: Console) -> int:
    """Write ``cockpit.png``, ``layers.png`` and ``samples.png`` of the run in ``run_dir``.

    Args:
        run_dir: A run directory written by ``cockpit run`` (finished or not).
        out: Directory for the figures (default: ``run_dir``).
        step_range: ``"A:B"`` to show only steps A to B, or ``None`` for the whole run.
        console: Where the written paths are listed.

    Returns:
        ``ExitCode.OK``.

    Raises:
        CockpitError: ``run_dir`` is not a readable run directory, or the step range is malformed
            or outside the run.
    """
    steps = parse_step_range(step_range) if step_range is not None else None
    run = read_run(run_dir)
    paths = write_report(run, Path(out) if out is not None else Path(run_dir), steps)
    shown = f" (steps {steps[0]}:{steps[1]})" if steps else ""
    for note in run.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"figures of {run.name}{shown}:", highlight=False)
    for path in paths:
        console.print(f"  {path}", highlight=False, soft_wrap=True)
    return int(ExitCode.OK)
