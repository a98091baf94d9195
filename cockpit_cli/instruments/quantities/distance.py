"""Distance: ||theta_t - theta_0|| per parameter, theta_0 being the parameters at attach time."""

from __future__ import annotations

from typing import Any

import torch

from cockpit_cli.instruments.quantities.base import Quantity, StepData, difference_norms, register


@register
class Distance(Quantity):
    name = "Distance"
    carried = ("origin",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.origin: list[torch.Tensor] | None = None

    def attach(self, params: list[torch.Tensor], plain_sgd: bool) -> None:
        """Remember theta_0."""
        self.origin = [p.detach().clone() for p in params]

    def compute(self, data: StepData) -> None:
        if self.origin is None:
            self.attach(data.params, data.plain_sgd)
        data.emit(self.name, difference_norms(data.params, self.origin))
