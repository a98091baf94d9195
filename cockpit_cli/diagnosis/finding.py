"""What a diagnosis reports: findings with their evidence, and the rules it could not check."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


def severity_rank(severity: str) -> int:
    """Return 0 for ``info``, 1 for ``warning``, 2 for ``error``.

    Raises:
        ValueError: ``severity`` is not one of :data:`SEVERITIES`.
    """
    return SEVERITIES.index(severity)  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    """Make ``value`` JSON-safe: non-finite floats become strings (``"nan"``, ``"inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass(frozen=True)
class Evidence:
    """One measured value compared with the threshold it crossed.

    Attributes:
        metric: What was measured, e.g. ``"median Alpha (last 50% of tracked steps)"``.
        value: The measured value (a number, or a word such as a run status).
        threshold: The value it is compared with.
        comparison: How: ``">"``, ``">="``, ``"<"``, ``"<="``, ``"=="``, ``"outside"``, ``"not"``,
            or ``"context"`` for a value shown for context only (``threshold`` is then ``None``).
    """

    metric: str
    value: Any
    threshold: Any
    comparison: str

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": _plain(self.value), "threshold": _plain(self.threshold), "comparison": self.comparison}


def context(metric: str, value: object) -> Evidence:
    """Evidence shown for context, not compared with a threshold."""
    return Evidence(metric, value, None, "context")


@dataclass(frozen=True)
class Finding:
    """A problem a rule found in a run.

    Attributes:
        rule: Name of the rule (e.g. ``"lr_too_large"``).
        severity: ``info``, ``warning`` or ``error``.
        steps: First and last step the finding is based on.
        evidence: The measurements that crossed their thresholds.
        meaning: One or two sentences on what this means for training.
        hint: What to try.
    """

    rule: str
    severity: Severity
    steps: tuple[int, int]
    evidence: tuple[Evidence, ...]
    meaning: str
    hint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "steps": list(self.steps),
            "evidence": [item.to_dict() for item in self.evidence],
            "meaning": self.meaning,
            "hint": self.hint,
        }


@dataclass(frozen=True)
class NotChecked:
    """A rule the run's data could not support, and what would enable it.

    Attributes:
        rule: Name of the rule.
        reason: What is missing, e.g. ``"needs HessMaxEV"``.
        enable: How to record it, e.g. ``"preset full, or instruments.quantities.HessMaxEV: true"``,
            or how to record more of it when the run has too few records.
        too_few: Whether the run records what the rule needs, only too few of it (a longer run
            would do), rather than not at all.
    """

    rule: str
    reason: str
    enable: str
    too_few: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "reason": self.reason, "enable": self.enable, "too_few": self.too_few}


@dataclass
class Diagnosis:
    """The outcome of running the rules over one run.

    Attributes:
        run: Facts about the run (name, problem, optimizer, status, steps).
        findings: Findings, most severe first.
        checked: Names of the rules that ran.
        not_checked: Rules skipped for lack of data.
        notes: What the run directory's reader had to work around (a cut-off line, missing records).
    """

    run: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_checked: list[NotChecked] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def worst(self) -> str | None:
        """Return the highest severity among the findings, or ``None`` if there are none."""
        if not self.findings:
            return None
        return max((finding.severity for finding in self.findings), key=severity_rank)

    def healthy(self) -> bool:
        """True when no finding is a warning or an error."""
        worst = self.worst()
        return worst is None or severity_rank(worst) < severity_rank("warning")
