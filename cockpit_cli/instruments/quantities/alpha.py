"""Alpha: the local effective step size (-1 no progress, 0 ideal, +1 overshoot), from a 1-D quadratic fit.

Between the start of step t (theta_t, mini-batch B_t) and the start of step t+1 (theta_{t+1},
mini-batch B_{t+1}) a 1-D quadratic is fitted along the update d = theta_{t+1} - theta_t to the
two mini-batch losses and the two slopes g.d/||d||, by least squares weighted with their sample
variances. ``alpha = 2 ||d|| / x_bar - 1`` with ``x_bar = -mu1/mu2`` the point where the fit
returns to its starting height: -1 means the step made no progress, 0 that it landed at the
minimum of the fit, +1 that it overshot to the same height on the other side. A concave fit
gives -1. The value belongs to step t but is known one step later (``lag = 1``).

The per-sample slopes at the start are exact for every optimizer: for plain SGD they follow
from the per-sample dot products with the gradient (d = -lr g); otherwise the engine computes
them with one forward-mode pass along d on B_t (no per-sample gradient is kept).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import INDIVIDUAL_LOSSES, PARAMS_BEFORE, Quantity, StepData, UpdateData, flat_dot, register

START_SLOPES = "start_slopes"  # the engine keeps what it needs for a forward-mode pass at theta_t
VARIANCE_FLOOR = 1e-10


@register
class Alpha(Quantity):
    name = "Alpha"
    carried = ("start", "pending")
    lag = 1
    per_sample = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plain_sgd = False
        self.start: dict[str, Any] | None = None  # observations at theta_t, until the update
        self.pending: dict[str, Any] | None = None  # start observations + direction, until t+1

    def attach(self, params: list[torch.Tensor], plain_sgd: bool) -> None:
        self.plain_sgd = plain_sgd

    def _ends_at(self, step: int) -> bool:
        return self.pending is not None and self.pending["step"] == step - 1

    def is_active(self, step: int) -> bool:
        return self.schedule(step) or self._ends_at(step)

    def requirements(self, step: int) -> set[str]:
        needs = {INDIVIDUAL_LOSSES}
        if self._ends_at(step):
            needs.add(r.PROJECTIONS)
        if self.schedule(step):
            needs |= {PARAMS_BEFORE, r.SAMPLE_DOTS} if self.plain_sgd else {PARAMS_BEFORE, START_SLOPES}
        return needs

    def reduction_options(self, step: int, options: r.ReductionOptions) -> None:
        if self._ends_at(step):
            options.direction = self.pending["direction"]

    def compute(self, data: StepData) -> None:
        var_f = _variance(data.individual_losses)
        if self._ends_at(data.step):
            pending, self.pending = self.pending, None
            slopes = data.reductions.totals[r.PROJECTIONS] / pending["length"] if pending["length"] > 0 else None
            value = self._alpha(pending, data.loss, var_f, slopes)
            data.emit(self.name, value, step=pending["step"])
        if self.schedule(data.step):
            self.start = {"step": data.step, "f": data.loss, "var_f": var_f, "lr": data.lr}
            if self.plain_sgd:
                self.start["dots"] = data.reductions.totals[r.SAMPLE_DOTS]

    def after_update(self, data: UpdateData) -> None:
        start, self.start = self.start, None
        if start is None or start["step"] != data.step:
            return
        direction = data.updates
        length = math.sqrt(flat_dot(direction, direction))
        if length > 0:
            if self.plain_sgd:
                products = -start["lr"] * start["dots"]  # g_i . d with d = -lr g
            else:
                products = data.start_slopes(direction)
            slopes = products / length
            start["df"], start["var_df"] = float(slopes.mean()), _variance(slopes)
        start.update(direction=direction, length=length)
        self.pending = start

    @staticmethod
    def _alpha(start: dict[str, Any], f_end: float, var_f_end: float, slopes_end: torch.Tensor | None) -> float:
        if start["length"] == 0.0 or slopes_end is None:
            return -1.0
        return fit_alpha(
            start["length"],
            (start["f"], f_end),
            (start["df"], float(slopes_end.mean())),
            (start["var_f"], var_f_end),
            (start["var_df"], _variance(slopes_end)),
        )


def _variance(values: torch.Tensor) -> float:
    """Unbiased sample variance of a ``[N]`` tensor as a float."""
    return float(values.double().var(unbiased=True)) if values.numel() > 1 else 0.0


def fit_alpha(length: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float], var_dfs: tuple[float, float]) -> float:
    """Fit the weighted quadratic to two noisy values and slopes and return alpha.

    Args:
        length: Distance t between the two points (> 0).
        fs: Losses at 0 and t.
        dfs: Slopes along the direction at 0 and t.
        var_fs: Their sample variances (zeros replaced by 1e-10).
        var_dfs: The slopes' sample variances (zeros replaced by 1e-10).

    Returns:
        ``2 t / (-mu1 / mu2) - 1``, or -1 for a concave (or degenerate) fit.
    """
    t = length
    design = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]]).T  # [3, 4]
    variances = np.array([*var_fs, *var_dfs], dtype=np.float64)
    variances[variances == 0.0] = VARIANCE_FLOOR
    weights = np.diag(1.0 / variances)
    observations = np.array([*fs, *dfs], dtype=np.float64)
    try:
        mu = np.linalg.solve(design @ weights @ design.T, design @ weights @ observations)
    except np.linalg.LinAlgError:
        return -1.0
    if not np.all(np.isfinite(mu)) or mu[2] <= 0.0:
        return -1.0  # concave or flat along d: still going downhill where the step ended
    other_side = -mu[1] / mu[2]
    return float(2.0 * t / other_side - 1.0) if other_side != 0.0 else float("inf")
