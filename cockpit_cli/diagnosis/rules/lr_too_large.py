"""Learning rate too large: steps overshoot the minimum along their direction (Alpha near +1)."""

from __future__ import annotations

import math

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.diagnosis.windows import Series

ALPHA = 0.5  # median Alpha over the recent steps above this: consistent overshooting
DECAYED = 0.5  # a learning rate that ended below this share of its start already decays
LATE_HINT = (
    "add a decaying schedule (cosine, or step decay by 10x): the steps fit in the first half (median Alpha {early:.2g}) "
    "and overshoot only later, as the gradient noise takes over; a smaller constant rate would slow the start"
)
STABILITY = 2.0  # gradient descent on a quadratic diverges when lr * lambda_max > 2 (1 + momentum)


def sharpness(run: RunSeries) -> Series:
    """``lr * HessMaxEV`` at every step that tracked a finite HessMaxEV."""
    rates = dict(zip(run.lr().steps, run.lr().values))
    curvature = run.scalar("HessMaxEV")
    pairs = [(step, rates[step] * abs(value)) for step, value in zip(curvature.steps, curvature.values) if step in rates and math.isfinite(value)]
    return Series([step for step, _ in pairs], [value for _, value in pairs])


class LrTooLarge(Rule):
    name = "lr_too_large"
    priority = 30
    requires = (("Alpha", "HessMaxEV"),)
    source = "Cockpit paper (alpha near +1 = overshooting; good runs have median alpha 0 to 0.3); lr * lambda_max > 2 instability of gradient descent"
    meaning = "Steps jump across the valley instead of into it: the loss along each step's direction rises again before the step ends."
    hint = "lower the learning rate (try 3-10x smaller) or add a decaying schedule"

    def check(self, run: RunSeries) -> Finding | None:
        evidence, spans, hint = [], [], None
        tracked = run.finite_scalar("Alpha")  # after a divergence: the steps before it
        alpha = tracked.last()
        if len(alpha) >= self.min_points and alpha.median() > ALPHA:
            evidence.append(Evidence("median Alpha, last 50% of tracked steps", alpha.median(), ALPHA, ">"))
            evidence.append(context("share of those steps with Alpha > 0", alpha.fraction(lambda a: a > 0)))
            spans.append(alpha.span())
            early = tracked.between(0.0, 0.5)
            if len(early) >= self.min_points and early.median() <= ALPHA and not self._decays(run):
                hint = LATE_HINT.format(early=early.median())
        if run.optimizer() == "SGD":
            limit = STABILITY * (1.0 + run.optimizer_setting("momentum"))
            product = sharpness(run).last()
            if len(product) >= self.min_points and product.median() > limit:
                evidence.append(Evidence("median lr * HessMaxEV, last 50% of tracked steps", product.median(), limit, ">"))
                spans.append(product.span())
                hint = None  # beyond the stability limit: the rate itself is too large
        if not evidence:
            return None
        return self.report((min(s[0] for s in spans), max(s[1] for s in spans)), evidence, hint=hint)

    @staticmethod
    def _decays(run: RunSeries) -> bool:
        """Whether the learning rate already decays (it ended below half its start)."""
        rates = run.lr()
        return len(rates) > 1 and rates.last(0.1).median() < DECAYED * rates.first().median()
