"""Stalled training: the loss has barely moved since the start although steps are being taken."""

from __future__ import annotations

import math

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.rules.lr_too_small import ALPHA
from cockpit_cli.diagnosis.series import RunSeries

FLAT = 0.05  # relative loss change over the second half of the run below this (TheDeepChecker)
PROGRESS = 0.1  # ... and relative change since the start below this


class StalledTraining(Rule):
    name = "stalled_training"
    priority = 60
    requires = ("loss", "lr")
    min_points = 20
    min_share = 0.3  # a network's first steps can sit on a plateau: live, the rule said 'not learning' at step 24 of 1280
    source = "TheDeepChecker (loss decreasing < 5% per window); DeepDiagnosis (loss not decreasing)"
    meaning = "The loss has stayed close to where it started: the model is not learning, although the learning rate is not tiny."
    hint = "check that labels match inputs, try another learning rate (larger and smaller), and check the initialisation"

    def check(self, run: RunSeries) -> Finding | None:
        if not run.lr().last().median() > 0:
            return None  # a zero learning rate is reported as frozen parameters
        if run.count("Alpha") and run.scalar("Alpha").last().median() < ALPHA:
            return None  # steps far too short are reported as a learning rate too small
        loss = run.loss().map(lambda value: value if math.isfinite(value) else math.nan)
        start, middle, end = loss.first().median(), loss.between(0.5, 0.6).median(), loss.last(0.1).median()
        if not (start > 0 and middle > 0 and math.isfinite(end)):
            return None  # no finite loss to judge (a diverged run is reported as divergence)
        flat, progress = abs(middle - end) / middle, abs(start - end) / start
        if flat >= FLAT or progress >= PROGRESS:
            return None  # moving, down or (reported by other rules) up
        evidence = [
            Evidence("relative loss change over the second half of the run", flat, FLAT, "<"),
            Evidence("relative loss change since the start", progress, PROGRESS, "<"),
        ]
        return self.report(loss.last().span(), evidence)
