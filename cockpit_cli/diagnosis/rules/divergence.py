"""Divergence: a non-finite loss or gradient, a run stopped as diverged, or a loss far above its start."""

from __future__ import annotations

import math

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.diagnosis.windows import Series

GROWTH = 10.0  # recent median loss above this multiple of the starting loss,
ABSOLUTE = 1e3  # or above this value when that comes first (AUTOTRAINER's loss >= 1e3)


def _first_non_finite(series: Series) -> int | None:
    return next((step for step, value in zip(series.steps, series.values) if not math.isfinite(value)), None)


class Divergence(Rule):
    name = "divergence"
    severity = "error"
    priority = 0
    requires = ("loss",)
    min_points = 1
    source = "AUTOTRAINER (NaN loss, loss >= 1e3); DeepOBS stops on NaN"
    meaning = "The optimisation blew up: the loss or the gradients became non-finite or grew far beyond their start."
    hint = "lower the learning rate (try 10x smaller), check the inputs' scale, or clip gradients"

    def check(self, run: RunSeries) -> Finding | None:
        loss, evidence = run.loss(), []
        last = loss.span()[1]
        first_bad = [step for step in (_first_non_finite(loss), _first_non_finite(run.total_norm())) if step is not None]
        if run.manifest.get("status") == "diverged":
            evidence.append(Evidence("run status", "diverged", "completed", "not"))
        if first_bad:
            evidence.append(Evidence(f"first non-finite loss or gradient norm (step {min(first_bad)})", math.nan, "finite", "not"))
        finite = loss.map(lambda value: value if math.isfinite(value) else math.nan)
        # The start is the lowest of the first three losses, not their median: a run that blows
        # up at its second step has a median start as high as its end.
        start = min((value for value in finite.first(0.0, 3).values if not math.isnan(value)), default=math.nan)
        recent = finite.last(0.1).median()
        threshold = GROWTH * start if start >= ABSOLUTE else min(GROWTH * start, ABSOLUTE)
        if len(loss) >= 10 and start > 0 and recent > threshold:
            evidence.append(Evidence("median loss, last 10% of steps", recent, threshold, ">"))
        if not evidence:
            return None
        return self.report((min(first_bad, default=loss.span()[0]), last), evidence, hint=self.hint.removesuffix("clip gradients") + run.clipping_advice())
