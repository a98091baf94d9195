"""The per-sample loss function a user gives, as the instruments read it: one loss per sample.

Loss modules with ``reduction="none"`` give one value per output element: ``nn.MSELoss`` of
outputs ``[N, K]`` gives ``[N, K]``, a cross-entropy over sequences ``[N, T]``. Their mean
reduction averages every element, so averaging a sample's elements gives the per-sample losses
whose mean is the loss (Alpha reads their spread; the torch.func passes differentiate them).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

PerSampleLoss = Callable[[Any, Any], Tensor]


def per_sample_means(function: PerSampleLoss) -> PerSampleLoss:
    """Return ``(outputs, targets) -> [N]``: ``function``'s values, each sample's elements averaged.

    The returned function raises ``ValueError`` for a value without a sample axis (a reduced loss).
    """

    def losses(outputs: Any, targets: Any) -> Tensor:
        values = function(outputs, targets)
        if not isinstance(values, Tensor) or values.dim() == 0:
            raise ValueError(
                f"the per-sample loss function returned {_shown(values)}, not one loss per sample; "
                "give it reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))"
            )
        return values if values.dim() == 1 else values.flatten(1).mean(1)

    return losses


def one_per_sample(losses: Tensor, samples: int) -> Tensor:
    """Return the per-sample losses ``[N]`` of a batch of ``samples`` as they are, or raise
    ``ValueError`` where there are more (a loss over flattened positions)."""
    if losses.shape[0] != samples:
        raise ValueError(
            f"the per-sample loss function returned {losses.shape[0]} values for a batch of {samples}, not one loss per "
            "sample; for a loss over flattened positions, return each sample's mean: losses.view(len(outputs), -1).mean(1)"
        )
    return losses


def _shown(values: Any) -> str:
    return f"a scalar ({float(values):.4g})" if isinstance(values, Tensor) else f"a {type(values).__name__}"
