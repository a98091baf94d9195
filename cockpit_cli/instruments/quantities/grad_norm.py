"""GradNorm: the 2-norm of the mini-batch gradient, per parameter."""

from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class GradNorm(Quantity):
    name = "GradNorm"

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.grad_norms)
