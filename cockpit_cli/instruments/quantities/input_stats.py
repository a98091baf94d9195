"""InputStats: mean, standard deviation, minimum and maximum of the input batch."""

import torch

from cockpit_cli.instruments.quantities.base import INPUTS, Quantity, StepData, register


@register
class InputStats(Quantity):
    name = "InputStats"

    def requirements(self, step: int) -> set[str]:
        return {INPUTS}

    def compute(self, data: StepData) -> None:
        inputs = data.inputs.detach()
        low, high = inputs.aminmax()  # exact in the inputs' dtype: no float64 pass needed
        wide = inputs.double()
        mean, std, low, high = torch.stack((wide.mean(), wide.std(unbiased=False), low.double(), high.double())).tolist()  # exact: float64 holds every value of the inputs' dtype
        data.emit(self.name, {"mean": mean, "std": std, "min": low, "max": high})
