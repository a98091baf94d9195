"""A batch's inputs: one tensor, a tuple of tensors for a model with several positional inputs
(``model(*inputs)``), or a dict of tensors for one that takes keyword arguments
(``model(**inputs)``), each with the samples along its first dimension.

The instruments read the batch size and device from them, run the model on them again
(``torch.func``, forward mode), and describe the floating-point ones (InputStats: token ids and
masks are no measurements).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | tuple[Tensor, ...] | dict[str, Tensor]


def check_inputs(inputs: object) -> None:
    """Raise a ``TypeError`` that says what is expected unless ``inputs`` is a tensor, a
    non-empty tuple or list of tensors, or a non-empty dict of tensors by keyword, with the
    samples along their first dimension."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return
    if isinstance(inputs, (tuple, list)) and inputs and all(_is_batch(t) for t in inputs):
        return
    if isinstance(inputs, dict) and inputs and all(isinstance(k, str) and _is_batch(t) for k, t in inputs.items()):
        return
    raise TypeError(
        f"inputs: expected the model's input batch, a tensor, or a tuple of tensors for a model with several "
        f"inputs (model(*inputs)), or a dict of tensors for one of keyword arguments (model(**inputs)), each "
        f"with the samples along its first dimension; got {_describe(inputs)}"
    )


def _is_batch(value: object) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dim()}-d tensor"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of " + (", ".join(_describe(item) for item in value) or "nothing")
    if isinstance(value, dict):
        return "a dict of " + (", ".join(f"{key!r}: {_describe(item)}" for key, item in value.items()) or "nothing")
    return type(value).__name__


def model_args(inputs: Inputs) -> tuple[Tensor, ...]:
    """Return the model's positional arguments (none for keyword inputs)."""
    if isinstance(inputs, dict):
        return ()
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def model_kwargs(inputs: Inputs) -> dict[str, Tensor]:
    """Return the model's keyword arguments (none for positional inputs)."""
    return dict(inputs) if isinstance(inputs, dict) else {}


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Run ``model`` on the batch: ``model(*args)`` or ``model(**kwargs)``."""
    return model(*model_args(inputs), **model_kwargs(inputs))


def _tensors(inputs: Inputs) -> list[Tensor]:
    return [*model_args(inputs), *model_kwargs(inputs).values()]


def first_input(inputs: Inputs) -> Tensor:
    """Return the first input tensor (positional, else by keyword)."""
    return _tensors(inputs)[0]


def batch_size(inputs: Inputs) -> int:
    """Return the number of samples ``N`` (the first dimension of the first input)."""
    return first_input(inputs).shape[0]


def batch_device(inputs: Inputs) -> torch.device:
    """Return the device of the (first) input."""
    return first_input(inputs).device


def floating_columns(inputs: Inputs) -> Tensor | None:
    """Return the floating-point inputs as one ``[N, M]`` tensor (each flattened per sample, side
    by side), or ``None`` where there are none."""
    floating = [t.detach().reshape(t.shape[0], -1) for t in _tensors(inputs) if t.is_floating_point()]
    if not floating:
        return None
    return floating[0] if len(floating) == 1 else torch.cat([t.to(torch.promote_types(t.dtype, floating[0].dtype)) for t in floating], dim=1)
