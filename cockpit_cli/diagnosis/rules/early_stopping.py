"""Early stopping: the evidence-based criterion says further steps fit noise rather than signal."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries

SUSTAINED = 0.5  # share of the recent tracked steps with EarlyStopping > 0


class EarlyStopping(Rule):
    name = "early_stopping"
    severity = "info"
    priority = 80
    requires = ("EarlyStopping",)
    source = "Mahsereci et al. 2017 (evidence-based stopping criterion: > 0 suggests stopping), as tracked by Cockpit"
    meaning = "The mini-batch gradients are mostly noise around zero: the training loss cannot be reduced much further with this batch size."
    hint = "stop training (or keep the best validation checkpoint); a larger batch or a smaller learning rate could still reduce the loss"

    def check(self, run: RunSeries) -> Finding | None:
        recent = run.finite_scalar("EarlyStopping").last()
        if len(recent) < self.min_points:
            return None
        share = recent.fraction(lambda value: value > 0)
        if share < SUSTAINED:
            return None
        return self.report(recent.span(), [Evidence("share of the last 50% of tracked steps with EarlyStopping > 0", share, SUSTAINED, ">=")])
