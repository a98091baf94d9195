"""Diagnosis during training: the same rules over the records seen so far, one alert per episode.

:class:`LiveDiagnosis` is an observer of the training loop. Every ``check_every`` steps (and at once
on a non-finite loss) it runs the rules over everything recorded so far. A rule that starts firing opens an *episode* and
raises one alert; further checks that still find it stay silent. The episode closes after the
rule has been quiet for ``quiet_checks`` consecutive checks (counting those that saw new
quantities, where the run tracks any: checks between two tracked steps judge the same values),
so a problem that comes back later
is announced again, while one that flickers around its threshold is announced once. A closed
episode is announced too, and at the end of the run every episode whose rule no longer finds
its problem is closed, so the open ones are exactly what ``cockpit diagnose`` reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Iterable

from cockpit_cli.diagnosis.engine import run_rules
from cockpit_cli.diagnosis.finding import Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries


def _as_dict(record: Any) -> dict[str, Any]:
    """A record as a plain dict (records may be dicts, dataclasses or have ``to_dict``)."""
    if isinstance(record, dict):
        return record
    if hasattr(record, "to_dict"):
        return record.to_dict()
    return asdict(record) if is_dataclass(record) else dict(record)


@dataclass
class Episode:
    """A rule's open episode.

    Attributes:
        opened_at: The last step seen when it opened.
        quiet: Consecutive checks since without the rule's finding.
    """

    opened_at: int
    quiet: int = 0


class LiveDiagnosis:
    """Runs the rules while a run trains and reports each problem once per episode.

    Args:
        on_alert: Called with each new finding (the start of an episode).
        on_clear: Called when an episode closes, with the rule's name, the last step seen when the
            episode opened and the last step seen now.
        check_every: Run the rules every this many steps (every 1% of the steps seen so far once
            that is more, which bounds the cost on long runs), and at the end.
        quiet_checks: Consecutive checks without a finding that close its episode.
        rules: The rules to run (default: every registered rule).
        manifest: The run's manifest so far (``instruments.parameters`` in particular); also
            filled by :meth:`on_start`.
        config: The effective config as a mapping.
        history: The step and evaluation records a resumed run kept from before its checkpoint
            (as in the run directory): the rules see the whole run, as ``cockpit diagnose`` does.
    """

    def __init__(
        self,
        on_alert: Callable[[Finding], None] | None = None,
        check_every: int = 25,
        quiet_checks: int = 3,
        rules: Iterable[Rule] | None = None,
        manifest: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        on_clear: Callable[[str, int, int], None] | None = None,
        history: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    ):
        self.on_alert, self.on_clear = on_alert, on_clear
        self.check_every = max(1, check_every)
        self.quiet_checks = max(1, quiet_checks)
        self.rules = None if rules is None else list(rules)
        steps, evals = history or ([], [])
        self.series = RunSeries(dict(manifest or {}), list(steps), list(evals), config)
        self.active: dict[str, Episode] = {}  # by rule
        self.firing: set[str] = set()  # rules that found their problem at the last check
        self.alerts: list[Finding] = []
        self.checked_at = 0  # steps seen at the last check (the history's are checked with the first new ones)
        self.tracked = sum(1 for record in steps if record.get("quantities"))  # step records that carry quantities
        self.tracked_at_check = self.tracked

    def on_start(self, meta: Any) -> None:
        """Take the parameter names and optimizer from the run's start facts (a ``RunMeta``)."""
        facts = _as_dict(meta)
        self.series.manifest.update({key: facts[key] for key in ("problem", "optimizer", "batch_size", "total_steps", "instruments") if key in facts})

    def on_step(self, record: Any) -> None:
        """Add a step record; check every ``check_every`` steps (1% of the steps so far in long runs), and on a non-finite loss."""
        record = _as_dict(record)
        self.series.steps.append(record)
        self.tracked += bool(record.get("quantities"))
        loss, seen = record.get("loss"), len(self.series.steps)
        if seen - self.checked_at >= max(self.check_every, seen // 100) or (isinstance(loss, float) and not math.isfinite(loss)):
            self.check()

    def on_eval(self, record: Any) -> None:
        """Add an evaluation record."""
        self.series.evals.append(_as_dict(record))

    def on_end(self, end: Any) -> None:
        """Run a last check with the final status; close the episodes whose rule it no longer fires."""
        status = getattr(end, "status", None)
        if status is not None:
            self.series.manifest["status"] = getattr(status, "value", status)
        self.check()
        for rule in [rule for rule in self.active if rule not in self.firing]:
            self._close(rule)

    def check(self) -> list[Finding]:
        """Run the rules now; return (and announce) the findings that open a new episode."""
        self.checked_at = len(self.series.steps)
        # a quiet check counts once new quantities arrived (or where none are tracked): checks
        # between two tracked steps see the same Alpha, and closed an episode on one value
        fresh = self.tracked > self.tracked_at_check or not self.tracked
        self.tracked_at_check = self.tracked
        findings, _, _ = run_rules(self.series, self.rules)
        firing = {finding.rule: finding for finding in findings}
        self.firing = set(firing)
        new = [finding for rule, finding in firing.items() if rule not in self.active]
        for rule, episode in list(self.active.items()):
            episode.quiet = 0 if rule in firing else episode.quiet + fresh
            if episode.quiet >= self.quiet_checks:
                self._close(rule)
        for finding in new:
            self.active[finding.rule] = Episode(self._last_step())
            self.alerts.append(finding)
            if self.on_alert is not None:
                self.on_alert(finding)
        return new

    def _last_step(self) -> int:
        """The step of the latest record (0 before any)."""
        return int(self.series.steps[-1].get("step", len(self.series.steps) - 1)) if self.series.steps else 0

    def _close(self, rule: str) -> None:
        """End ``rule``'s episode and announce it."""
        episode = self.active.pop(rule)
        if self.on_clear is not None:
            self.on_clear(rule, episode.opened_at, self._last_step())
