"""InputStats: mean, standard deviation, minimum and maximum of the input batch (its
floating-point inputs: token ids and masks are left out; a model of integer inputs alone has
no InputStats, see ``engine.NO_MEASURED_INPUTS``)."""

import torch

from cockpit_cli.instruments.moments import mean_and_std, wide_sums
from cockpit_cli.instruments.quantities.base import INPUTS, Quantity, StepData, register

# Below this ratio of variance to squared mean, the float64 sums' rounding (relative 1e-16 of
# the squared mean) could show in the variance's eighth digit.
CANCELLATION = 1e-8


@register
class InputStats(Quantity):
    name = "InputStats"

    def requirements(self, step: int) -> set[str]:
        return {INPUTS}

    def compute(self, data: StepData) -> None:
        inputs = data.inputs.detach()
        # One transfer; min and max are exact in the inputs' dtype, and float64 holds every value of it.
        total, squares, low, high = torch.stack((*wide_sums(inputs), *inputs.aminmax())).tolist()
        mean, std = mean_and_std(total, squares, inputs.numel())
        if std * std < CANCELLATION * mean * mean:  # the sums lost the spread: take it in two passes
            std = float(inputs.double().std(unbiased=False))
        data.emit(self.name, {"mean": mean, "std": std, "min": low, "max": high})
