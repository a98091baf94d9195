"""Vanishing gradients: early layers' gradients are orders of magnitude below the last layer's."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries, recent_histograms
from cockpit_cli.diagnosis.values import peak_shares
from cockpit_cli.diagnosis.windows import finite_median

LAYER_RATIO = 1e-3  # a layer's gradient norm over the last layer's (AUTOTRAINER)
COLLAPSE = 0.999  # share of a parameter's per-sample gradient elements in two adjacent histogram bins
COLLAPSE_RATIO = 1e-2  # ... counts only in a layer whose gradient norm is this far below the last's


class VanishingGradients(Rule):
    name = "vanishing_gradients"
    priority = 21
    requires = (("GradNorm", "LayerStats"),)
    source = "AUTOTRAINER (||g_first|| / ||g_last|| < 1e-3); Cockpit paper (per-layer gradient histogram collapses into one bin)"
    meaning = "The early layers barely receive a gradient, so they hardly learn while the last layers do."
    hint = "use ReLU-like activations instead of sigmoid/tanh, a shallower network, a better-scaled initialisation, or normalisation layers"

    def check(self, run: RunSeries) -> Finding | None:
        ratios = {layer: ratio for layer, ratio in run.layer_ratios().items() if ratio > 0}  # zero: dead units
        if not ratios:
            return None
        layer, ratio = min(ratios.items(), key=lambda item: item[1])
        evidence = []
        if ratio < LAYER_RATIO:
            evidence.append(Evidence(f"median gradient norm of layer {layer} / last layer, last 50%", ratio, LAYER_RATIO, "<"))
        shares = [peak_shares(histogram) for histogram in recent_histograms(run).values]
        for name, indices in run.layers().items():
            share = max(finite_median([row[i] for row in shares if i < len(row)]) for i in indices)
            if ratios.get(name, 1.0) < COLLAPSE_RATIO and share >= COLLAPSE:
                evidence.append(Evidence(f"share of layer {name}'s per-sample gradients in 2 adjacent histogram bins", share, COLLAPSE, ">="))
        if not evidence:
            return None
        return self.report(run.total_norm().last().span(), evidence)
