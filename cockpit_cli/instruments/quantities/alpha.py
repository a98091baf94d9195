"""Alpha: the local effective step size (-1 no progress, 0 ideal, +1 overshoot), from a 1-D quadratic fit.

Between the start of step t (theta_t, mini-batch B_t) and the start of step t+1 (theta_{t+1},
mini-batch B_{t+1}) a 1-D quadratic is fitted along the update d = theta_{t+1} - theta_t to the
two mini-batch losses and the two slopes g.d/||d||, by least squares weighted with their sample
variances. ``alpha = 2 ||d|| / x_bar - 1`` with ``x_bar = -mu1/mu2`` the point where the fit
returns to its starting height: -1 means the step made no progress, 0 that it landed at the
minimum of the fit, +1 that it overshot to the same height on the other side. A concave fit
gives -1; a non-finite loss, slope or step gives NaN (there is nothing to fit). The value belongs to step t but is known one step later (``lag = 1``).

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

# The engine keeps what it needs for a forward-mode pass at theta_t; with plain SGD it hands it
# over only where the update was not -lr g of the step's backward pass (the gradients changed
# after it: clipped, accumulated over micro-batches, unscaled), where the dot products fail.
START_SLOPES = "start_slopes"
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
            needs |= {PARAMS_BEFORE, START_SLOPES, r.SAMPLE_DOTS} if self.plain_sgd else {PARAMS_BEFORE, START_SLOPES}
        return needs

    def reduction_options(self, step: int, options: r.ReductionOptions) -> None:
        if self._ends_at(step):
            options.direction = self.pending["direction"]

    def compute(self, data: StepData) -> None:
        ending = self.pending if self._ends_at(data.step) else None
        starting = self.schedule(data.step)
        # The step's [N] vectors in one reduction: losses, end slopes (times ||d||), start dot products.
        vectors = {"f": data.individual_losses}
        if ending is not None and ending["length"] > 0:
            vectors["df_end"] = data.reductions.totals[r.PROJECTIONS]  # g_i . d
        if starting and self.plain_sgd:
            vectors["dots"] = data.reductions.totals[r.SAMPLE_DOTS]  # g_i . g
        moments = dict(zip(vectors, means_and_variances(list(vectors.values()))))
        _, var_f = moments["f"]
        if ending is not None:
            self.pending = None
            data.emit(self.name, self._alpha(ending, data.loss, var_f, moments.get("df_end")), step=ending["step"])
        if starting:
            self.start = {"step": data.step, "f": data.loss, "var_f": var_f, "lr": data.lr}
            if self.plain_sgd:
                self.start["dots"] = moments["dots"]

    def forget(self, step: int) -> None:
        if self._ends_at(step):
            self.pending = None  # the end point is lost with its slopes: no alpha for the start

    def after_update(self, data: UpdateData) -> None:
        start, self.start = self.start, None
        if start is None or start["step"] != data.step:
            return
        direction = data.updates
        length = math.sqrt(math.fsum(size * size for size in data.update_norms))  # ||d||, from the norms UpdateSize shares
        dots = start.pop("dots", None)
        if length > 0:
            if self.plain_sgd and data.start_slopes is None:  # the update was -lr g: g_i . d = -lr g_i . g
                (mean, variance), scale = dots, -start["lr"]
            else:
                [(mean, variance)], scale = means_and_variances([data.start_slopes(direction)]), 1.0
            start["df"], start["var_df"] = scale * mean / length, scale * scale * variance / (length * length)
        start.update(direction=direction, length=length)
        self.pending = start

    @staticmethod
    def _alpha(start: dict[str, Any], f_end: float, var_f_end: float, projections_end: tuple[float, float] | None) -> float:
        """Return alpha from the start's observations and the end's; ``projections_end`` holds
        the mean and variance of the end's products g_i . d (``None`` when ``d = 0``)."""
        length = start["length"]
        if not math.isfinite(length):
            return math.nan
        if length == 0.0 or projections_end is None:
            return -1.0
        mean, variance = projections_end
        return fit_alpha(length, (start["f"], f_end), (start["df"], mean / length), (start["var_f"], var_f_end), (start["var_df"], variance / (length * length)))


def means_and_variances(vectors: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Return the mean and the unbiased sample variance (0 for one sample) of each ``[N]`` vector.

    The vectors are reduced together in float64: one stacked ``var_mean`` and one transfer to
    Python floats, whatever their number (on a small model every tensor operation costs
    microseconds).

    Args:
        vectors: ``k`` tensors of shape ``[N]`` (one N for all).

    Returns:
        ``k`` pairs ``(mean, variance)``.
    """
    rows = torch.stack(vectors).to(torch.float64)  # [k, N]
    if rows.shape[1] <= 1:
        return [(mean, 0.0) for mean in rows.sum(1).tolist()]
    variances, means = torch.var_mean(rows, dim=1)  # unbiased
    return list(zip(*torch.stack((means, variances)).tolist()))


def fit_alpha(length: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float], var_dfs: tuple[float, float]) -> float:
    """Fit the weighted quadratic to two noisy values and slopes and return alpha.

    The fit ``f(x) = mu0 + mu1 x + mu2 x^2`` minimises the four observations' squared errors
    weighted by their inverse variances. A quadratic's values and slopes at 0 and t satisfy one
    identity, the trapezoid rule ``f(t) - f(0) = t/2 (f'(0) + f'(t))``, and nothing else: with
    ``c = (-1, 1, -t/2, -t/2)`` the identity's coefficients on ``y = (f0, f1, d0, d1)`` and ``V``
    their variances, the weighted least-squares fit is the quadratic through the corrected
    observations ``y - lambda V c`` with ``lambda = c.y / (c V c)``, the misfit of the identity
    shared out in proportion to each observation's variance. Its minimum and alpha follow from
    the corrected slopes: ``mu1 = d0'``, ``mu2 = (d1' - d0') / 2t``, ``alpha = -d1' / d0'``.
    (The normal equations, solved before, square the condition of the fit: with a variance near
    zero, slopes that hardly differ between samples, they lost four digits of alpha.)

    Args:
        length: Distance t between the two points.
        fs: Losses at 0 and t.
        dfs: Slopes along the direction at 0 and t.
        var_fs: Their sample variances (zeros replaced by 1e-10).
        var_dfs: The slopes' sample variances (zeros replaced by 1e-10).

    Returns:
        ``2 t / (-mu1 / mu2) - 1``, -1 for a concave (or degenerate) fit, NaN when an
        observation is not finite (a diverged step: no fit, rather than a made-up -1).
    """
    if not all(math.isfinite(value) for value in (length, *fs, *dfs, *var_fs, *var_dfs)):
        return math.nan
    t = length
    if t <= 0.0:
        return -1.0  # no step: no fit along it
    (f0, f1), (d0, d1) = fs, dfs
    v0, v1, v2, v3 = (v if v != 0.0 else VARIANCE_FLOOR for v in (*var_fs, *var_dfs))
    misfit = f1 - f0 - 0.5 * t * (d0 + d1)
    share = misfit / (v0 + v1 + 0.25 * t * t * (v2 + v3))  # lambda
    start, end = d0 + 0.5 * t * share * v2, d1 + 0.5 * t * share * v3  # the corrected slopes
    if end <= start:
        return -1.0  # concave or flat along d: still going downhill where the step ended
    return -end / start if start != 0.0 else float("inf")
