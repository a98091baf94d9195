"""Learning rate too small: steps cover a tiny part of the way to the minimum (Alpha near -1)."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.rules.lr_too_large import STABILITY
from cockpit_cli.diagnosis.series import RunSeries

ALPHA = -0.9  # median Alpha over the recent steps below this: steps far too short
ROOM = 10  # with less room than this factor below the stability limit, the hint names the limit


class LrTooSmall(Rule):
    name = "lr_too_small"
    priority = 40
    requires = ("Alpha", "loss", "lr")
    source = "Cockpit paper (alpha near -1 = steps far too small)"
    meaning = "Each step moves only a small fraction of the distance to the minimum along its direction, so the loss falls slowly."
    hint = "raise the learning rate (try 3-10x larger) or use a warm-up that ends at a larger rate"

    def check(self, run: RunSeries) -> Finding | None:
        alpha = run.finite_scalar("Alpha").last()  # after a divergence: the steps before it
        if len(alpha) < self.min_points or alpha.median() >= ALPHA or not run.lr().last().median() > 0:
            return None  # a zero learning rate is reported as frozen parameters
        loss = run.loss()
        start, end = loss.first().median(), loss.last(0.1).median()
        evidence = [Evidence("median Alpha, last 50% of tracked steps", alpha.median(), ALPHA, "<")]
        if start > 0:
            evidence.append(context("loss decrease since the start (relative)", (start - end) / start))
        return self.report(alpha.span(), evidence, hint=self._bounded_hint(run))

    @staticmethod
    def _bounded_hint(run: RunSeries) -> str | None:
        """For SGD with HessMaxEV tracked: how far the rate may rise before gradient descent turns
        unstable at the largest eigenvalue seen (``None``: the general hint; Rosenbrock at 0.001
        did best at 2x and diverged at 5x, where '3-10x larger' was the advice)."""
        curvature = run.finite_scalar("HessMaxEV")
        rate = run.lr().last().median()
        if run.optimizer() != "SGD" or not len(curvature) or not rate > 0:
            return None
        step, largest = max(zip(curvature.steps, curvature.values), key=lambda pair: abs(pair[1]))
        bound = STABILITY * (1.0 + run.optimizer_setting("momentum"))
        limit = bound / abs(largest)
        if not rate < limit < ROOM * rate:  # far from the limit, or (noisy curvature) past it already
            return None
        return (
            f"raise the learning rate, but to less than {limit:.2g} ({limit / rate:.2g}x), where lr x HessMaxEV reaches {bound:g} "
            f"at the largest eigenvalue seen ({abs(largest):.3g}, step {step}) and gradient descent turns unstable"
        )
