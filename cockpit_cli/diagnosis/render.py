"""Presenting a :class:`Diagnosis`: Rich text for people, a versioned JSON structure for programs.

JSON structure (``schema_version`` 1)::

    {
      "schema_version": 1,
      "run": {"name", "problem", "optimizer", "status", "steps", "tracked_steps"},
      "healthy": true,                  # no finding of severity warning or error
      "worst": "warning",               # highest severity found, null when none
      "findings": [                     # most severe first, root causes before symptoms
        {"rule", "severity", "steps": [first, last],
         "evidence": [{"metric", "value", "threshold", "comparison"}],
         "meaning", "hint"}
      ],
      "checked": ["divergence", ...],   # rules that ran
      "not_checked": [{"rule", "reason", "enable", "too_few"}],
      "notes": ["steps.jsonl: the last line ...", ...]   # what reading the run directory worked around
    }

``comparison`` is one of ``>``, ``>=``, ``<``, ``<=``, ``==``, ``outside`` (threshold is a
``[low, high]`` range), ``not`` (value is not the threshold, e.g. ``nan`` is not ``finite``)
or ``context`` (shown for context; threshold ``null``). Non-finite numbers are strings.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group
from rich.text import Text

from cockpit_cli.diagnosis.finding import Diagnosis, Evidence, Finding

SCHEMA_VERSION = 1
STYLES = {"error": "bold red", "warning": "bold yellow", "info": "bold cyan"}


def diagnosis_to_dict(diagnosis: Diagnosis) -> dict[str, Any]:
    """The JSON structure documented in this module's docstring."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run": diagnosis.run,
        "healthy": diagnosis.healthy(),
        "worst": diagnosis.worst(),
        "findings": [finding.to_dict() for finding in diagnosis.findings],
        "checked": list(diagnosis.checked),
        "not_checked": [item.to_dict() for item in diagnosis.not_checked],
        "notes": list(diagnosis.notes),
    }


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits, ranges as ``[low, high]``, anything else as text."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def describe(evidence: Evidence) -> str:
    """One line: the metric, its value and how it compares with the threshold."""
    value = format_value(evidence.value)
    if evidence.comparison == "context":
        return f"{evidence.metric}: {value}"
    if evidence.comparison == "not":
        return f"{evidence.metric}: {value} (expected {format_value(evidence.threshold)})"
    if evidence.comparison == "outside":
        return f"{evidence.metric}: {value}, outside {format_value(evidence.threshold)}"
    return f"{evidence.metric}: {value} {evidence.comparison} {format_value(evidence.threshold)}"


def render_finding(finding: Finding) -> Text:
    """A finding as a block of lines: header, evidence, meaning and what to try."""
    first, last = finding.steps
    steps = f"step {first}" if first == last else f"steps {first}-{last}"
    text = Text.assemble((f"{finding.severity.upper():<8}", STYLES[finding.severity]), (finding.rule, "bold"), f"  {steps}\n")
    for evidence in finding.evidence:
        text.append(f"  - {describe(evidence)}\n")
    text.append("  meaning: ", style="dim").append(f"{finding.meaning}\n")
    text.append("  try: ", style="dim").append(finding.hint)
    return text


def render_text(diagnosis: Diagnosis) -> Group:
    """The whole report: the run, what reading it worked around, findings most severe first (or
    "healthy"), and skipped rules."""
    run = diagnosis.run
    parts: list[Any] = [
        Text.assemble(
            ("diagnosis of ", "bold"),
            (str(run.get("name")), "bold"),
            f": {run.get('problem') or '?'} with {run.get('optimizer') or '?'}, {run.get('status')}, "
            f"{run.get('steps')} steps ({run.get('tracked_steps')} tracked)",
        )
    ]
    parts += [Text.assemble(("note: ", "bold yellow"), note) for note in diagnosis.notes]
    for finding in diagnosis.findings:
        parts += [Text(""), render_finding(finding)]
    if diagnosis.healthy():
        parts += [Text(""), Text.assemble(("healthy: no warnings", "bold green"), f" ({len(diagnosis.checked)} rules checked)")]
    if diagnosis.not_checked:
        parts += [Text(""), Text("not checked:", style="dim")]
        listed = diagnosis.not_checked
        diverged = run.get("status") == "diverged" or any(finding.rule == "divergence" for finding in diagnosis.findings)
        if diverged:  # no longer run would check these: the divergence comes first (on_nonfinite: skip tracks no more steps)
            cut_short = [item.rule for item in listed if item.too_few]
            listed = [item for item in listed if not item.too_few]
            if cut_short:
                parts.append(Text(f"  {', '.join(cut_short)}: too few records before the run diverged; a run that does not diverge checks them", style="dim"))
        for item in listed:
            parts.append(Text(f"  {item.rule}: {item.reason}; to check it: {item.enable}", style="dim"))
    return Group(*parts)
