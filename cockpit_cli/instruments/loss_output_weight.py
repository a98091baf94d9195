"""The curvature of a loss module's output that enters the loss backpropagated times a factor.

A loop may backpropagate ``w * loss_fn(outputs, targets)`` (``0.5 * loss``, a loss divided by
the micro-batches it is accumulated over). The Hessian of that loss with respect to the outputs is
``w`` times the module's, but BackPACK's loss rules factor the module's alone (they only warn that
its output "seems to have been modified"). The factor with which the module's output enters the
loss is the gradient that reaches the module's output, ``g_out``: the rules below multiply the
module's symmetric factor by ``sqrt(w)``. A factor that is not positive has no such square root.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class OutputWeighted:
    """Mixin for BackPACK's loss derivatives: the Hessian factors of ``w`` times the module's loss."""

    def sqrt_hessian(self, module: nn.Module, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        return weighted_factor(super().sqrt_hessian(module, g_inp, g_out, subsampling=subsampling), g_out)  # type: ignore[misc]

    def sqrt_hessian_sampled(self, module: nn.Module, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        factor = super().sqrt_hessian_sampled(module, g_inp, g_out, mc_samples=mc_samples, subsampling=subsampling)  # type: ignore[misc]
        return weighted_factor(factor, g_out)

    @classmethod
    def _check_loss_has_not_been_modified(cls, module: nn.Module, g_out: tuple) -> None:
        """A weighted output is followed (:func:`weighted_factor`), not warned about."""


def weighted_factor(factor: Tensor, g_out: tuple | None) -> Tensor:
    """Return the module's Hessian factor (any shape) scaled to the loss backpropagated:
    ``sqrt(w) * factor``, with ``w`` the gradient at the module's scalar output."""
    if g_out is None or g_out[0] is None:
        return factor
    weight = float(g_out[0])
    if weight == 1.0:
        return factor
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"the loss module's output enters the loss backpropagated times {weight:g}: a curvature diagonal needs a positive factor"
        )
    return factor * math.sqrt(weight)
