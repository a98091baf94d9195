"""The shape of a diagnosis rule: what it needs, how it is ranked, and how it reports."""

from __future__ import annotations

from typing import ClassVar

from cockpit_cli.diagnosis.finding import Evidence, Finding, Severity, context
from cockpit_cli.diagnosis.series import RunSeries

Requirement = str | tuple[str, ...]
MAX_EVIDENCE = 5  # longer evidence lists are cut, with a count of what was left out


class Rule:
    """A check over a run's series that returns at most one :class:`Finding`.

    Subclasses set the class attributes and implement :meth:`check`.

    Attributes:
        name: Identifier shown in reports (snake case).
        severity: Severity of its findings.
        priority: Order among findings of equal severity: root causes (lower) before symptoms.
        requires: Record fields or quantities the rule reads. A tuple inside means "any of these".
            The engine skips the rule (and says why) when one is missing.
        min_points: Fewest tracked records each required series must hold.
        min_share: Share of its planned steps a run still training must have taken before the
            rule judges it (AUTOTRAINER starts its loss checks after 30% of training).
        source: The published work its thresholds come from.
        meaning: What the finding means for training.
        hint: What to try.
    """

    name: ClassVar[str]
    severity: ClassVar[Severity] = "warning"
    priority: ClassVar[int] = 50
    requires: ClassVar[tuple[Requirement, ...]] = ()
    min_points: ClassVar[int] = 5
    min_share: ClassVar[float] = 0.0
    source: ClassVar[str] = ""
    meaning: ClassVar[str] = ""
    hint: ClassVar[str] = ""

    def check(self, run: RunSeries) -> Finding | None:
        """Return a finding when the run shows the problem, else ``None``."""
        raise NotImplementedError

    def report(self, steps: tuple[int, int], evidence: list[Evidence], hint: str | None = None) -> Finding:
        """Build this rule's finding from the ``evidence`` over ``steps`` (at most :data:`MAX_EVIDENCE` items)."""
        if len(evidence) > MAX_EVIDENCE:
            left_out = len(evidence) - MAX_EVIDENCE + 1
            evidence = evidence[: MAX_EVIDENCE - 1] + [context("further parameters or layers past the same threshold", left_out)]
        return Finding(
            rule=self.name,
            severity=self.severity,
            steps=(int(steps[0]), int(steps[1])),
            evidence=tuple(evidence),
            meaning=self.meaning,
            hint=hint or self.hint,
        )
