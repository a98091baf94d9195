"""The factor of the loss that a training step backpropagates.

A number (``1 / k`` for gradients accumulated over ``k`` micro-batches) or the gradient scaler of
mixed-precision training (``torch.amp.GradScaler``), whose factor keeps the float16 gradients of
the layers' outputs from underflowing: the backward pass of ``scale * loss`` leaves ``scale``
times the loss's gradients in the parameters, and the instruments divide what they read from it.
"""

from __future__ import annotations

import math
from typing import Protocol, Union

from torch import Tensor


class LossScaler(Protocol):
    """What the instruments use of a gradient scaler (``torch.amp.GradScaler``)."""

    def scale(self, outputs: Tensor) -> Tensor: ...

    def get_scale(self) -> float: ...


LossScale = Union[float, LossScaler]


def is_scaler(scale: object) -> bool:
    """Whether ``scale`` is a gradient scaler rather than a number."""
    return callable(getattr(scale, "scale", None)) and callable(getattr(scale, "get_scale", None))


def checked_scale(scale: object) -> LossScale:
    """Return ``scale`` as a float or a scaler, or raise where it is neither, or not a positive
    finite number (a caller's mistake, said as such)."""
    if is_scaler(scale):
        return scale  # type: ignore[return-value]
    if isinstance(scale, Tensor) and scale.numel() == 1:
        scale = float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: a {type(scale).__name__}; give a number (1 / k for k micro-batches) or a torch.amp.GradScaler")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: {scale}; give a positive number (1 / k for k micro-batches) or a torch.amp.GradScaler")
    return float(scale)


def scaled_loss(loss: Tensor, scale: LossScale) -> Tensor:
    """``scale * loss`` (``loss`` itself for a scale of 1), what a backward pass backpropagates."""
    if is_scaler(scale):
        return scale.scale(loss)  # type: ignore[union-attr]
    return loss if scale == 1.0 else loss * scale


def scale_factor(loss: Tensor, scale: LossScale) -> float:
    """Return the factor of ``scale`` as a number (waiting for the GPU that holds a scaler's).

    A scaler scales ``loss`` once here: the factor its ``step()`` reads is set up by its first
    ``scale()``, which the caller's loop leaves to the instruments.
    """
    if not is_scaler(scale):
        return float(scale)  # type: ignore[arg-type]
    scale.scale(loss)  # type: ignore[union-attr]
    return float(scale.get_scale())  # type: ignore[union-attr]
