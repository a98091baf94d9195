"""InnerTest: sqrt( sum_i (g_i . g - ||g||^2)^2 / (N (N-1) ||g||^4) ) (Bollapragada et al.)."""

import math

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, gradient_test_defined, register


@register
class InnerTest(Quantity):
    name = "InnerTest"
    per_sample = True

    def requirements(self, step: int) -> set[str]:
        return {r.SAMPLE_DOTS, r.GRAD_SQ_NORM}

    def compute(self, data: StepData) -> None:
        n = data.batch_size
        totals = data.reductions.totals
        grad_sq = data.reductions.scalar(r.GRAD_SQ_NORM)
        if not gradient_test_defined(n, grad_sq):
            return
        value = float((totals[r.SAMPLE_DOTS] - grad_sq).pow_(2).sum().div_(n * (n - 1) * (grad_sq * grad_sq)))
        data.emit(self.name, math.sqrt(max(value, 0.0)))
