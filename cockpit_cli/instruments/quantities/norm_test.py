"""NormTest: sqrt( sum_i ||g_i - g||^2 / (N (N-1) ||g||^2) ) (Byrd et al.'s norm test)."""

import math

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, gradient_test_defined, register


@register
class NormTest(Quantity):
    name = "NormTest"
    per_sample = True

    def requirements(self, step: int) -> set[str]:
        return {r.CENTERED_TOTAL, r.GRAD_SQ_NORM}

    def compute(self, data: StepData) -> None:
        n, grad_sq = data.batch_size, data.reductions.scalar(r.GRAD_SQ_NORM)
        if not gradient_test_defined(n, grad_sq):
            return
        value = data.reductions.scalar(r.CENTERED_TOTAL) / (n * (n - 1) * grad_sq)
        data.emit(self.name, math.sqrt(max(value, 0.0)))
