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

import torch

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.quantities.base import INDIVIDUAL_LOSSES, PARAMS_BEFORE, Quantity, StepData, UpdateData, register

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

    def next_active(self, step: int) -> int | None:
        scheduled = self.schedule.next_step(step)
        if self.pending is not None and self.pending["step"] + 1 >= step:
            completion = self.pending["step"] + 1
            return completion if scheduled is None else min(scheduled, completion)
        return scheduled

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
        _, var_f = _mean_and_variance(data.individual_losses)
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
        length = math.sqrt(math.fsum(size * size for size in data.update_norms))  # ||d||, from the norms UpdateSize shares
        if length > 0:
            if self.plain_sgd:
                products = -start["lr"] * start["dots"]  # g_i . d with d = -lr g
            else:
                products = data.start_slopes(direction)
            start["df"], start["var_df"] = _mean_and_variance(products / length)
        start.update(direction=direction, length=length)
        self.pending = start

    @staticmethod
    def _alpha(start: dict[str, Any], f_end: float, var_f_end: float, slopes_end: torch.Tensor | None) -> float:
        if start["length"] == 0.0 or slopes_end is None:
            return -1.0
        df_end, var_df_end = _mean_and_variance(slopes_end)
        return fit_alpha(start["length"], (start["f"], f_end), (start["df"], df_end), (start["var_f"], var_f_end), (start["var_df"], var_df_end))


def _mean_and_variance(values: torch.Tensor) -> tuple[float, float]:
    """Return the mean and the unbiased sample variance (0 for one sample) of ``[N]`` values as floats (one fused reduction)."""
    values = values.double()
    if values.numel() <= 1:
        return float(values.mean()), 0.0
    variance, mean = torch.var_mean(values)  # unbiased
    return float(mean), float(variance)


def fit_alpha(length: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float], var_dfs: tuple[float, float]) -> float:
    """Fit the weighted quadratic to two noisy values and slopes and return alpha.

    The fit ``f(x) = mu0 + mu1 x + mu2 x^2`` solves the 3 x 3 weighted normal equations of the
    four observations, written out (plain float64 arithmetic: too small for an array library).

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
    w0, w1, w2, w3 = (1.0 / (v if v != 0.0 else VARIANCE_FLOOR) for v in (*var_fs, *var_dfs))
    (f0, f1), (d0, d1) = fs, dfs
    # Design rows (1, 0, 0), (1, t, t^2), (0, 1, 0), (0, 1, 2t): normal matrix and right-hand side.
    tt, two_t = t * t, 2.0 * t
    normal = [
        [w0 + w1, w1 * t, w1 * tt],
        [w1 * t, w1 * tt + w2 + w3, w1 * tt * t + w3 * two_t],
        [w1 * tt, w1 * tt * t + w3 * two_t, w1 * tt * tt + w3 * two_t * two_t],
    ]
    right = [w0 * f0 + w1 * f1, w1 * t * f1 + w2 * d0 + w3 * d1, w1 * tt * f1 + w3 * two_t * d1]
    mu = solve(normal, right)
    if mu is None or not all(math.isfinite(m) for m in mu) or mu[2] <= 0.0:
        return -1.0  # singular, concave or flat along d: still going downhill where the step ended
    other_side = -mu[1] / mu[2]
    return float(2.0 * t / other_side - 1.0) if other_side != 0.0 else float("inf")


def solve(matrix: list[list[float]], right: list[float]) -> list[float] | None:
    """Solve the 3 x 3 system ``matrix @ x = right`` by Gaussian elimination with partial pivoting.

    Args:
        matrix: ``[3, 3]`` rows.
        right: ``[3]``.

    Returns:
        ``x`` (``[3]``), or ``None`` when a pivot is exactly zero (a singular matrix).
    """
    rows = [[*row, value] for row, value in zip(matrix, right)]  # augmented [3, 4]
    for col in range(3):
        pivot = col
        for k in range(col + 1, 3):
            if abs(rows[k][col]) > abs(rows[pivot][col]):
                pivot = k
        if rows[pivot][col] == 0.0:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        top = rows[col]
        for row in rows[col + 1 :]:
            factor = row[col] / top[col]
            for c in range(col, 4):
                row[c] -= factor * top[c]
    x2 = rows[2][3] / rows[2][2]
    x1 = (rows[1][3] - rows[1][2] * x2) / rows[1][1]
    x0 = (rows[0][3] - rows[0][1] * x1 - rows[0][2] * x2) / rows[0][0]
    return [x0, x1, x2]
