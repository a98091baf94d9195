"""Learning rate too small: steps cover a tiny part of the way to the minimum (Alpha near -1)."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries

ALPHA = -0.9  # median Alpha over the recent steps below this: steps far too short


class LrTooSmall(Rule):
    name = "lr_too_small"
    priority = 40
    requires = ("Alpha", "loss", "lr")
    source = "Cockpit paper (alpha near -1 = steps far too small)"
    meaning = "Each step moves only a small fraction of the distance to the minimum along its direction, so the loss falls slowly."
    hint = "raise the learning rate (try 3-10x larger) or use a warm-up that ends at a larger rate"

    def check(self, run: RunSeries) -> Finding | None:
        alpha = run.scalar("Alpha").finite().last()  # after a divergence: the finite steps before it
        if len(alpha) < self.min_points or alpha.median() >= ALPHA or not run.lr().last().median() > 0:
            return None  # a zero learning rate is reported as frozen parameters
        loss = run.loss()
        start, end = loss.first().median(), loss.last(0.1).median()
        evidence = [Evidence("median Alpha, last 50% of tracked steps", alpha.median(), ALPHA, "<")]
        if start > 0:
            evidence.append(context("loss decrease since the start (relative)", (start - end) / start))
        return self.report(alpha.span(), evidence)
