"""MeanGSNR: mean over coordinates of g_d^2 / ((1/N) sum_i g_id^2 - g_d^2 + 1e-5) (Liu et al.)."""

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class MeanGSNR(Quantity):
    name = "MeanGSNR"
    per_sample = True

    def requirements(self, step: int) -> set[str]:
        return {r.GSNR_SUM}

    def compute(self, data: StepData) -> None:
        if data.batch_size < 2:  # one sample has no variance: the ratio would be g_d^2 / 1e-5
            return
        data.emit(self.name, data.reductions.scalar(r.GSNR_SUM) / data.reductions.coordinates)
