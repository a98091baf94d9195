"""Gradient noise dominates: the batch is too small for the noise in the per-sample gradients."""

from __future__ import annotations

import math

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries

NORM_TEST = 0.95  # median norm test after the first 10% of tracked steps at or above this
UNCONVERGED = 0.5  # ... while the loss has fallen by less than this fraction of its start


class GradientNoise(Rule):
    """NormTest^2 estimates the share of the mini-batch gradient's squared norm that is noise.

    It is ``B_simple / (B + B_simple)`` with McCandlish et al.'s noise scale
    ``B_simple = tr(Sigma) / |G|^2``, so it approaches 1 from below when noise dominates;
    0.95 means the noise is about 9 times the signal (``B <= B_simple / 9``). Near a minimum every
    run becomes noise-dominated, so the rule only speaks while the loss is far from converged.
    """

    name = "gradient_noise"
    priority = 50
    requires = ("NormTest", "loss")
    source = "Byrd et al. 2012 norm test; McCandlish et al. 2018 (noise scale B_simple = tr(Sigma) / |G|^2)"
    meaning = (
        "The mini-batch gradient is mostly noise: its deviation from the full gradient outweighs "
        "the gradient itself, so steps wander instead of descending."
    )
    hint = "use a larger batch, or a smaller learning rate (the noise per step grows with lr / batch size)"

    def check(self, run: RunSeries) -> Finding | None:
        norm_test = run.scalar("NormTest").between(0.1, 1.0)
        loss = run.loss()
        start, end = loss.first().median(), loss.last(0.1).median()
        progress = (start - end) / start if start > 0 else 0.0
        value = norm_test.median()
        batch, micro = _size(run.manifest.get("batch_size")), _size(run.manifest.get("micro_batch_size"))
        measured = micro or batch  # the samples NormTest describes (a run of the Python API learns them at its first step)
        noise_scale = measured * value**2 / (1 - value**2) if measured and value < 1 else None
        judged = value
        if micro and batch and noise_scale is not None:  # the step's gradient is the mean of its micro-batches'
            judged = math.sqrt(noise_scale / (batch + noise_scale))
        if not (judged >= NORM_TEST and progress < UNCONVERGED):
            return None
        if judged is value:
            evidence = [Evidence("median NormTest, tracked steps after the first 10%", value, NORM_TEST, ">=")]
        else:
            evidence = [
                Evidence(f"NormTest of the batch of {batch}, from B_simple", judged, NORM_TEST, ">="),
                context(f"median NormTest of the first micro-batch of {micro}, tracked steps after the first 10%", value),
            ]
        evidence.append(Evidence("relative loss decrease since the start", progress, UNCONVERGED, "<"))
        if noise_scale is not None:
            evidence.append(context(f"noise scale B_simple = B * NormTest^2 / (1 - NormTest^2) (batch size {measured})", noise_scale))
        return self.report(norm_test.span(), evidence)


def _size(value: object) -> int | None:
    """A batch size from the manifest, or ``None`` where it is not a positive integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
