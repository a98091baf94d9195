"""Distance: ||theta_t - theta_0|| per parameter, theta_0 being the parameters at attach time."""

from __future__ import annotations

from typing import Any

import torch

from cockpit_cli.instruments.quantities.base import Quantity, StepData, register


@register
class Distance(Quantity):
    name = "Distance"
    carried = ("origin",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.origin: list[torch.Tensor] | None = None

    def set_origin(self, params: list[torch.Tensor]) -> None:
        """Remember theta_0 (called by the engine when it attaches)."""
        self.origin = [p.detach().clone() for p in params]

    def compute(self, data: StepData) -> None:
        if self.origin is None:
            self.set_origin(data.params)
        distances = [float(torch.linalg.vector_norm(p.detach() - p0)) for p, p0 in zip(data.params, self.origin)]
        data.emit(self.name, distances)
