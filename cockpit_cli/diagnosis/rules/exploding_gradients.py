"""Exploding gradients: the gradient norm grows by orders of magnitude, or early layers' dwarf the last's."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries

GROWTH = 100.0  # recent median gradient norm over the early median: two orders of magnitude
LAYER_RATIO = 70.0  # a layer's gradient norm over the last layer's (AUTOTRAINER)


class ExplodingGradients(Rule):
    name = "exploding_gradients"
    priority = 20
    requires = (("GradNorm", "LayerStats"),)
    source = "AUTOTRAINER (||g_first|| / ||g_last|| > 70); TheDeepChecker (gradient growth)"
    meaning = "Gradients are huge or keep growing, so each step changes the weights far more than intended."
    hint = "lower the learning rate, use a smaller initialisation (init_scale) or normalisation layers, or clip gradients"

    def check(self, run: RunSeries) -> Finding | None:
        evidence = []
        total = run.total_norm()
        early, recent = total.first().median(), total.last().median()
        if early > 0 and recent / early > GROWTH:
            evidence.append(Evidence("median gradient norm, last 50% / first 10% of tracked steps", recent / early, GROWTH, ">"))
        ratios = run.layer_ratios()
        if ratios:
            layer, ratio = max(ratios.items(), key=lambda item: item[1] if item[1] == item[1] else -1.0)
            if ratio > LAYER_RATIO:
                evidence.append(Evidence(f"median gradient norm of layer {layer} / last layer, last 50%", ratio, LAYER_RATIO, ">"))
        if not evidence:
            return None
        return self.report(total.last().span(), evidence, hint=self.hint.removesuffix("clip gradients") + run.clipping_advice())
