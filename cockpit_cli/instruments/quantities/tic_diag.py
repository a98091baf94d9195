"""TICDiag: Takeuchi's information criterion with a diagonal curvature (Thomas et al.).

``sum_d [(1/N) sum_i g_id^2] / (h_d + 1e-7)``; ``h`` is the curvature diagonal chosen by the
instruments' ``curvature`` setting (exact Hessian, exact GGN or Monte-Carlo GGN).
"""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import CURVATURE, Quantity, StepData, register


@register
class TICDiag(Quantity):
    name = "TICDiag"
    per_sample = True
    needs_curvature = True

    def requirements(self, step: int) -> set[str]:
        return {r.TIC_DIAG_SUM, CURVATURE}

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.reductions.scalar(r.TIC_DIAG_SUM))
