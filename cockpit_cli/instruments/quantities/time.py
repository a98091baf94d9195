"""Time: seconds since the instruments were attached, at the end of the step's backward pass."""

from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class Time(Quantity):
    name = "Time"

    def compute(self, data: StepData) -> None:
        data.emit(self.name, data.elapsed)
