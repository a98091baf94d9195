"""HessTrace: the trace of the curvature diagonal, per parameter (Hessian, GGN or MC-GGN)."""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import CURVATURE, Quantity, StepData, register


@register
class HessTrace(Quantity):
    name = "HessTrace"
    needs_curvature = True

    def requirements(self, step: int) -> set[str]:
        return {r.CURVATURE_TRACE, CURVATURE}

    def compute(self, data: StepData) -> None:
        traces = data.reductions.per_param.get(r.CURVATURE_TRACE, [])
        data.emit(self.name, [None if t is None else float(t) for t in traces])
