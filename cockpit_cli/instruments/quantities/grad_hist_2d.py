"""GradHist2d: joint histogram of (individual-gradient element, parameter value).

Default (40, 50) bins over gradient (-1, 1) x parameter (-2, 2), values outside clamped into the
edge bins; whole network and per parameter. Counts are ``[gradient bin][parameter bin]``.
"""

from __future__ import annotations

from typing import Any

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.quantities.base import Quantity, StepData, counts_as_lists, register


@register
class GradHist2d(Quantity):
    name = "GradHist2d"
    per_sample = True
    options_defaults: dict[str, Any] = {"bins": (40, 50), "range": ((-1.0, 1.0), (-2.0, 2.0))}
    options_maximums = {"bins": 1_000}  # per axis: up to a million cells per tracked step, for the network and each parameter

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        (grad_low, grad_high), (param_low, param_high) = self.options["range"]
        grad_bins, param_bins = self.options["bins"]
        self.specs = (HistogramSpec(int(grad_bins), float(grad_low), float(grad_high)), HistogramSpec(int(param_bins), float(param_low), float(param_high)))

    def requirements(self, step: int) -> set[str]:
        return {r.HIST2D}

    def reduction_options(self, step: int, options: r.ReductionOptions) -> None:
        options.hist2d = self.specs

    def compute(self, data: StepData) -> None:
        grad_axis, param_axis = self.specs
        counts, per_parameter = counts_as_lists(data.reductions.totals[r.HIST2D], data.reductions.per_param.get(r.HIST2D, []))
        data.emit(
            self.name,
            {
                "counts": counts,
                "range": [[grad_axis.low, grad_axis.high], [param_axis.low, param_axis.high]],
                "per_parameter": per_parameter,
            },
        )
