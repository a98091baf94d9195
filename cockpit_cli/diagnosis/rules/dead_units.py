"""Dead units: ReLU-like units that output zero for every input, so their weights get no gradient."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.storage import schema

ZERO_GRADIENT = 0.7  # share of a parameter's gradient entries that are exactly zero (AUTOTRAINER)
ZERO_ACTIVATION = 0.95  # share of a layer's outputs that are exactly zero (healthy ReLU layers reach 0.85)


class DeadUnits(Rule):
    name = "dead_units"
    priority = 22
    requires = (("LayerStats", "Activations"),)
    source = "AUTOTRAINER (>= 70% zero gradient entries); DeepDiagnosis / TheDeepChecker (dead activations), threshold raised to 95%"
    meaning = "Many units output zero for every example; they pass no gradient back and have stopped learning."
    hint = "lower the learning rate, use leaky_relu, or a smaller learning rate at the start (warm-up)"

    def check(self, run: RunSeries) -> Finding | None:
        evidence, span = [], (0, 0)
        table = run.per_parameter("zero_grad_fraction").recent()
        tables = schema.lookup_tables(run.manifest)  # zero but in the rows of a batch's ids, whatever the units do
        for index, name in enumerate(run.parameters):
            if name in tables:
                continue
            share = table.column(index).median()
            if share >= ZERO_GRADIENT:
                evidence.append(Evidence(f"median share of zero gradient entries of {name}, last 50%", share, ZERO_GRADIENT, ">="))
                span = table.span()
        for layer, series in run.nested("Activations", "zero_fraction").items():
            recent = series.last()
            if recent.median() >= ZERO_ACTIVATION:
                evidence.append(Evidence(f"median share of zero outputs of layer {layer}, last 50%", recent.median(), ZERO_ACTIVATION, ">="))
                span = recent.span()
        if not evidence:
            return None
        return self.report(span, evidence)
