"""EarlyStopping: the evidence-based (EB) criterion of Mahsereci et al.; above 0 suggests stopping.

``1 - N * mean_d[ g_d^2 / (sigma_d^2 + 1e-5) ]`` with the unbiased per-coordinate variance
``sigma_d^2``; a value above 0 suggests stopping. Defined for plain SGD only.
"""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class EarlyStopping(Quantity):
    name = "EarlyStopping"
    per_sample = True
    plain_sgd_only = True

    def requirements(self, step: int) -> set[str]:
        return {r.EB_SUM}

    def compute(self, data: StepData) -> None:
        if data.batch_size < 2:  # one sample has no variance
            return
        mean_ratio = data.reductions.scalar(r.EB_SUM) / data.reductions.coordinates
        data.emit(self.name, 1.0 - data.batch_size * mean_ratio)
