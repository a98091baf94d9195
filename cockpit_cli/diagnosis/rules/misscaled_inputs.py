"""Misscaled inputs: the input batches are far from zero mean and unit scale."""

from __future__ import annotations

import math

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries, recent_histograms
from cockpit_cli.diagnosis.values import share_in_edges
from cockpit_cli.diagnosis.windows import finite_median

MEAN = 1.0  # |mean| of the inputs above this
STD_LOW, STD_HIGH = 0.1, 10.0  # standard deviation of the inputs outside this range
EXTREME = 100.0  # largest |input| above this


class MisscaledInputs(Rule):
    name = "misscaled_inputs"
    priority = 10
    requires = ("InputStats",)
    source = (
        "UMLAUT and DeepDiagnosis (inputs outside [-1, 1] -> normalise), relaxed to admit standardised data; "
        "Cockpit paper ([0, 255] inputs spread the gradient histogram into its edge bins)"
    )
    meaning = (
        "The network sees inputs far from the unit scale its initialisation assumes, "
        "so pre-activations and first-layer gradients are badly scaled."
    )
    hint = "normalise the inputs (subtract the mean, divide by the standard deviation, e.g. pixels to [0, 1])"

    def check(self, run: RunSeries) -> Finding | None:
        stats = {field: run.scalar("InputStats", field).last() for field in ("mean", "std", "min", "max")}
        mean, std = stats["mean"].median(), stats["std"].median()
        extreme = max(abs(stats["min"].median()), abs(stats["max"].median()))
        evidence = []
        if abs(mean) > MEAN:
            evidence.append(Evidence("|median input mean|", abs(mean), MEAN, ">"))
        if math.isfinite(std) and not STD_LOW <= std <= STD_HIGH:
            evidence.append(Evidence("median input standard deviation", std, [STD_LOW, STD_HIGH], "outside"))
        if extreme > EXTREME:
            evidence.append(Evidence("largest |input| (median over batches)", extreme, EXTREME, ">"))
        if not evidence:
            return None
        histograms = recent_histograms(run)
        if len(histograms):
            share = finite_median([share_in_edges(histogram) for histogram in histograms.values])
            if math.isfinite(share):
                evidence.append(context("share of per-sample gradient elements in GradHist1d's clamped edge bins", share))
        return self.report(stats["std"].span(), evidence)
