"""OrthoTest: sqrt( sum_i ||g_i - (g_i.g / ||g||^2) g||^2 / (N (N-1) ||g||^2) ) (Bollapragada et al.)."""

import math

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, gradient_test_defined, register


@register
class OrthoTest(Quantity):
    name = "OrthoTest"
    per_sample = True

    def requirements(self, step: int) -> set[str]:
        return {r.SAMPLE_DOTS, r.SAMPLE_SQ_NORMS, r.GRAD_SQ_NORM}

    def compute(self, data: StepData) -> None:
        n = data.batch_size
        totals = data.reductions.totals
        grad_sq = data.reductions.scalar(r.GRAD_SQ_NORM)
        if not gradient_test_defined(n, grad_sq):
            return
        # ||g_i - (g_i.g/||g||^2) g||^2 = ||g_i||^2 - (g_i.g)^2 / ||g||^2
        orthogonal = totals[r.SAMPLE_SQ_NORMS] - totals[r.SAMPLE_DOTS].pow(2).div_(grad_sq)
        value = float(orthogonal.sum().div_(n * (n - 1) * grad_sq))
        data.emit(self.name, math.sqrt(max(value, 0.0)))
