"""GradHist1d: histogram of all N x D individual-gradient elements, whole network and per parameter.

Default 100 bins over (-2, 2); values outside are counted in the edge bins. With
``adaptive: true`` the range is +-(largest |g_id| seen at the previous tracked step), so the
histogram follows gradients that shrink or grow by orders of magnitude.
"""

from __future__ import annotations

from typing import Any

from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.histograms import HistogramSpec
from cockpit_cli.instruments.quantities.base import Quantity, StepData, counts_as_lists, register


@register
class GradHist1d(Quantity):
    name = "GradHist1d"
    per_sample = True
    options_defaults: dict[str, Any] = {"bins": 100, "range": (-2.0, 2.0), "adaptive": False}
    options_maximums = {"bins": 10_000}  # each tracked step writes the counts, for the network and each parameter

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        low, high = self.options["range"]
        self.spec = HistogramSpec(int(self.options["bins"]), float(low), float(high))

    def state_dict(self) -> dict[str, Any]:
        """The current (possibly adapted) range, for checkpoints."""
        return {"range": [self.spec.low, self.spec.high]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "range" in state:
            low, high = state["range"]
            self.spec = HistogramSpec(self.spec.bins, float(low), float(high))

    def requirements(self, step: int) -> set[str]:
        return {r.HIST1D, r.ABS_MAX} if self.options["adaptive"] else {r.HIST1D}

    def reduction_options(self, step: int, options: r.ReductionOptions) -> None:
        options.hist1d = self.spec

    def compute(self, data: StepData) -> None:
        totals = data.reductions.totals
        counts, per_parameter = counts_as_lists(totals[r.HIST1D], data.reductions.per_param.get(r.HIST1D, []))
        data.emit(self.name, {"counts": counts, "range": [self.spec.low, self.spec.high], "per_parameter": per_parameter})
        if self.options["adaptive"] and r.ABS_MAX in totals:
            largest = data.reductions.scalar(r.ABS_MAX)
            if largest > 0.0:
                self.spec = HistogramSpec(self.spec.bins, -largest, largest)
