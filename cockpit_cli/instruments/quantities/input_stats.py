"""InputStats: mean, standard deviation, minimum and maximum of the input batch."""

from cockpit_cli.instruments.quantities.base import INPUTS, Quantity, StepData, register


@register
class InputStats(Quantity):
    name = "InputStats"

    def requirements(self, step: int) -> set[str]:
        return {INPUTS}

    def compute(self, data: StepData) -> None:
        inputs = data.inputs.detach().double()
        data.emit(
            self.name,
            {"mean": float(inputs.mean()), "std": float(inputs.std(unbiased=False)), "min": float(inputs.min()), "max": float(inputs.max())},
        )
