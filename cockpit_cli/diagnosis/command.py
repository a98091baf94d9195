"""The ``cockpit diagnose RUN_DIR`` command: read a run directory, run the rules, print the report."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cockpit_cli.diagnosis.engine import diagnose
from cockpit_cli.diagnosis.finding import SEVERITIES, severity_rank
from cockpit_cli.diagnosis.render import diagnosis_to_dict, render_text
from cockpit_cli.errors import CockpitError, ExitCode, did_you_mean
from cockpit_cli.storage.reader import read_run


def check_fail_on(fail_on: str | None) -> None:
    """Raise a :class:`CockpitError` unless ``fail_on`` is ``None`` or a severity."""
    if fail_on is not None and fail_on not in SEVERITIES:
        raise CockpitError(f"--fail-on '{fail_on}' is not a severity{did_you_mean(fail_on, SEVERITIES)}", f"use one of: {', '.join(SEVERITIES)}")


def run_diagnose(run_dir: Path, as_json: bool, fail_on: str | None, console: Console) -> int:
    """Diagnose the run in ``run_dir`` and print the report on ``console``.

    Args:
        run_dir: A run directory written by ``cockpit run`` (finished or not).
        as_json: Print the versioned JSON structure instead of text.
        fail_on: ``info``, ``warning`` or ``error``: exit non-zero when a finding at least this
            severe exists. ``None`` always exits 0.
        console: Where the report goes.

    Returns:
        ``ExitCode.FAILURE`` when a finding reaches ``fail_on``, else ``ExitCode.OK``.

    Raises:
        CockpitError: ``run_dir`` is not a readable run directory, or ``fail_on`` is unknown.
    """
    check_fail_on(fail_on)
    diagnosis = diagnose(read_run(run_dir))
    if as_json:
        console.print(json.dumps(diagnosis_to_dict(diagnosis), indent=2), markup=False, highlight=False, soft_wrap=True, emoji=False)
    else:
        console.print(render_text(diagnosis), soft_wrap=True)
    worst = diagnosis.worst()
    if fail_on is not None and worst is not None and severity_rank(worst) >= severity_rank(fail_on):
        return int(ExitCode.FAILURE)
    return int(ExitCode.OK)
