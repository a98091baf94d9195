"""Loss: the mini-batch loss (with the regulariser) at the step's start."""

from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class Loss(Quantity):
    name = "Loss"

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.loss)
