"""A batch's inputs: one tensor, or a tuple of tensors for a model with several positional inputs
(``model(*inputs)``), each with the samples along its first dimension.

The instruments read the batch size and device from them, run the model on them again
(``torch.func``, forward mode), and describe the floating-point ones (InputStats: token ids and
masks are no measurements).
"""

from __future__ import annotations

import torch
from torch import Tensor

Inputs = Tensor | tuple[Tensor, ...]


def check_inputs(inputs: object) -> None:
    """Raise a ``TypeError`` that says what is expected unless ``inputs`` is a tensor, or a
    non-empty tuple or list of tensors with the samples along their first dimension."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) and t.dim() > 0 for t in inputs):
        return
    raise TypeError(
        f"inputs: expected the model's input batch, a tensor, or a tuple of tensors for a model with several "
        f"inputs (model(*inputs)), each with the samples along its first dimension; got {_describe(inputs)}"
    )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dim()}-d tensor"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of " + (", ".join(_describe(item) for item in value) or "nothing")
    return type(value).__name__


def model_args(inputs: Inputs) -> tuple[Tensor, ...]:
    """Return the model's positional arguments: ``model(*model_args(inputs))``."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def batch_size(inputs: Inputs) -> int:
    """Return the number of samples ``N`` (the first dimension of the first input)."""
    return inputs.shape[0] if isinstance(inputs, Tensor) else inputs[0].shape[0]


def batch_device(inputs: Inputs) -> torch.device:
    """Return the device of the (first) input."""
    return model_args(inputs)[0].device


def floating_columns(inputs: Inputs) -> Tensor | None:
    """Return the floating-point inputs as one ``[N, M]`` tensor (each flattened per sample, side
    by side), or ``None`` where there are none."""
    floating = [t.detach().reshape(t.shape[0], -1) for t in model_args(inputs) if t.is_floating_point()]
    if not floating:
        return None
    return floating[0] if len(floating) == 1 else torch.cat([t.to(torch.promote_types(t.dtype, floating[0].dtype)) for t in floating], dim=1)
