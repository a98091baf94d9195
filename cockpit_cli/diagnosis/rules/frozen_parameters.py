"""Frozen parameters: parameters whose update stays exactly zero."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries

UNCHANGED = 0.9  # share of the recent tracked steps with an exactly zero update
ALL_FROZEN_HINT = "every parameter is frozen: check the learning rate and its schedule (a zero rate), and that the optimizer is given the model's parameters"


class FrozenParameters(Rule):
    name = "frozen_parameters"
    priority = 25
    requires = (("UpdateSize", "LayerStats"),)
    source = "DeepDiagnosis (tensor unchanged over 5 checks)"
    meaning = "Some parameters never change, so the part of the model they belong to does not learn."
    hint = "check requires_grad, the optimizer's parameter groups and their learning rates, and for dead units feeding the layer"

    def check(self, run: RunSeries) -> Finding | None:
        table = run.per_parameter("update").recent()
        frozen = []
        for index, name in enumerate(run.parameters):
            column = table.column(index)
            share = column.fraction(lambda value: value == 0)
            if len(column) >= self.min_points and share >= UNCHANGED:
                frozen.append(Evidence(f"share of the last 50% of tracked steps where {name} did not change", share, UNCHANGED, ">="))
        if not frozen:
            return None
        if len(frozen) < len(run.parameters):
            return self.report(table.span(), frozen)
        everything = Evidence(
            f"share of the last 50% of tracked steps where none of the {len(frozen)} parameters changed",
            min(item.value for item in frozen), UNCHANGED, ">=",
        )
        return self.report(table.span(), [everything], hint=ALL_FROZEN_HINT)
