"""Activations: mean, standard deviation and fraction of exact zeros of each layer's output.

Collected by forward hooks during the step's forward pass (only at tracked steps), for every
activation module and every leaf module with parameters; keyed by the module's name.
"""

from cockpit_cli.instruments.quantities.base import ACTIVATIONS, Quantity, StepData, register


@register
class Activations(Quantity):
    name = "Activations"

    def requirements(self, step: int) -> set[str]:
        return {ACTIVATIONS}

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.activations or {})
