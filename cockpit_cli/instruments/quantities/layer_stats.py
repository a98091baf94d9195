"""LayerStats: per parameter weight norm, gradient norm, update-to-weight ratio, zero-gradient fraction.

These are the per-layer views used by diagnosis (exploding / vanishing gradients, dead units,
frozen layers): ``update_ratio`` is ``||theta_{t+1} - theta_t|| / ||theta_t||`` and
``zero_grad_fraction`` the fraction of exactly-zero entries of the mini-batch gradient.
"""

from __future__ import annotations

import math
from typing import Any

from cockpit_cli.instruments.moments import zero_counts
from cockpit_cli.instruments.quantities.base import PARAMS_BEFORE, Quantity, StepData, UpdateData, register


@register
class LayerStats(Quantity):
    name = "LayerStats"
    carried = ("partial",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.partial: dict[int, dict[str, list[float]]] = {}

    def requirements(self, step: int) -> set[str]:
        return {PARAMS_BEFORE}

    def compute(self, data: StepData) -> None:
        self.partial[data.step] = {
            "weight_norm": data.param_norms,
            "grad_norm": data.grad_norms,
            "zero_grad_fraction": [zeros / max(g.numel(), 1) for zeros, g in zip(zero_counts(data.grads), data.grads)],
        }

    def after_update(self, data: UpdateData) -> None:
        stats = self.partial.pop(data.step, None)
        if stats is None:
            return
        ratios = []
        for change, weight in zip(data.update_norms, stats["weight_norm"]):
            if math.isnan(weight) or math.isnan(change):
                ratios.append(math.nan)  # after a divergence (a zero weight's inf would misname it)
            elif weight > 0:
                ratios.append(change / weight)
            else:
                ratios.append(0.0 if change == 0 else math.inf)
        stats["update_ratio"] = ratios
        data.emit(self.name, stats)

