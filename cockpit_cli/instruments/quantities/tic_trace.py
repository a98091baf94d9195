"""TICTrace: the trace form of TIC, sum_d (1/N) sum_i g_id^2 / (sum_d h_d + 1e-7)."""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import CURVATURE, Quantity, StepData, register


@register
class TICTrace(Quantity):
    name = "TICTrace"
    per_sample = True
    needs_curvature = True

    def requirements(self, step: int) -> set[str]:
        return {r.SECOND_MOMENT_TOTAL, r.CURVATURE_TRACE, CURVATURE}

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.reductions.scalar(r.SECOND_MOMENT_TOTAL) / (data.reductions.scalar(r.CURVATURE_TRACE) + r.TIC_EPSILON))
