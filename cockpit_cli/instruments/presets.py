"""Named sets of quantities: the Cockpit paper's presets plus cheap per-layer diagnostics.

``economy``, ``business`` and ``full`` are the published package's sets, each extended by the
diagnostics the ``diagnose`` command reads (per-layer statistics, activation and input
statistics), which cost a few reductions per step. ``none`` tracks nothing.
"""

from __future__ import annotations

COCKPIT_ECONOMY = ("Alpha", "Distance", "GradHist1d", "GradNorm", "InnerTest", "Loss", "NormTest", "OrthoTest", "UpdateSize")
COCKPIT_BUSINESS = COCKPIT_ECONOMY + ("TICDiag", "HessTrace")
COCKPIT_FULL = COCKPIT_BUSINESS + ("HessMaxEV", "GradHist2d")
DIAGNOSTICS = ("LayerStats", "Activations", "InputStats")

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "economy": COCKPIT_ECONOMY + DIAGNOSTICS,
    "business": COCKPIT_BUSINESS + DIAGNOSTICS,
    "full": COCKPIT_FULL + DIAGNOSTICS,
}
