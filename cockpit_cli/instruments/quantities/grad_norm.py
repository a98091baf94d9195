"""GradNorm: the 2-norm of the mini-batch gradient, per parameter."""

from cockpit_cli.instruments.quantities.base import Quantity, StepData, norms, register


@register
class GradNorm(Quantity):
    name = "GradNorm"

    def compute(self, data: StepData) -> None:
        data.emit(self.name, norms(data.grads))
