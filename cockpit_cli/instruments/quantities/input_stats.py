"""InputStats: mean, standard deviation, minimum and maximum of the input batch."""

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
        data.emit(self.name, {"mean": float(wide.mean()), "std": float(wide.std(unbiased=False)), "min": float(low), "max": float(high)})
