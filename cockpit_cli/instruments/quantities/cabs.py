"""CABS: the batch size suggested by Balles et al., lr * sum_d sum_i (g_id - g_d)^2 / (N L).

Defined for plain SGD only; with another optimizer the engine leaves it out and says why.
"""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class CABS(Quantity):
    name = "CABS"
    per_sample = True
    plain_sgd_only = True

    def requirements(self, step: int) -> set[str]:
        return {r.CENTERED_TOTAL}

    def compute(self, data: StepData) -> None:
        if data.batch_size < 2:  # one sample has no variance: the suggestion would be 0
            return
        centered = data.reductions.scalar(r.CENTERED_TOTAL)
        data.emit(self.name, data.lr * centered / (data.batch_size * data.loss))
