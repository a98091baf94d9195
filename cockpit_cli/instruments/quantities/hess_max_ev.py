"""HessMaxEV: the largest-magnitude eigenvalue of the mini-batch loss's Hessian.

Power iteration on Hessian-vector products (at most ``max_iterations``, stopping when the
Rayleigh quotient changes by less than ``atol + rtol * |lambda|``). Each tracked step starts from
the previous tracked step's eigenvector (``warm_start``), which usually converges in a few
products where a random start needs dozens. The random first start uses a private generator, so
tracking never changes the training's random numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cockpit_cli.instruments.quantities.base import HVP, Quantity, StepData, flat_dot, register


@register
class HessMaxEV(Quantity):
    name = "HessMaxEV"
    options_defaults: dict[str, Any] = {"max_iterations": 100, "rtol": 1e-3, "atol": 1e-6, "warm_start": True}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.eigenvector: list[Tensor] | None = None
        self.iterations: list[int] = []
        self.generator = torch.Generator().manual_seed(0)

    def requirements(self, step: int) -> set[str]:
        return {HVP}

    def _start(self, params: list[Tensor]) -> list[Tensor]:
        if self.options["warm_start"] and self.eigenvector is not None:
            return self.eigenvector
        return [torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device) for p in params]

    def compute(self, data: StepData) -> None:
        vector = _normalized(self._start(data.params))
        eigenvalue: float | None = None
        iterations = 0
        for iterations in range(1, int(self.options["max_iterations"]) + 1):
            product = [h.detach() for h in data.hvp(vector)]
            estimate = flat_dot(vector, product)
            size = math.sqrt(flat_dot(product, product))
            if size == 0.0:
                eigenvalue = 0.0
                break
            vector = [h / size for h in product]
            converged = eigenvalue is not None and abs(estimate - eigenvalue) <= self.options["atol"] + self.options["rtol"] * abs(eigenvalue)
            eigenvalue = estimate
            if converged:
                break
        self.eigenvector = vector
        self.iterations.append(iterations)
        data.emit(self.name, eigenvalue)


def _normalized(vector: list[Tensor]) -> list[Tensor]:
    size = math.sqrt(flat_dot(vector, vector))
    return [v / size for v in vector] if size > 0 else vector
