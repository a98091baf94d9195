"""Convolution geometry: the input patches a convolution multiplies, and its padding as numbers.

A convolution with one group and zero padding that is the same on both sides multiplies its
weight ``[C_out, C_in, *kernel]`` with the patches :func:`unfold` returns: per-sample gradients
and curvature diagonals of the weight are products of those patches with output-side factors. A
convolution that pads with its own values (``padding_mode`` circular, reflect or replicate) is
the same after its input is padded so (:func:`padded`), with no zeros added.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def unfold(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Return the input patches ``[N, C_in * prod(kernel), L]`` the convolution multiplies."""
    inputs, padding = padded(module, inputs), zero_padding(module)
    if isinstance(module, nn.Conv1d):
        inputs = inputs.unsqueeze(2)  # [N, C, 1, L]: a 1-D convolution is a 2-D one of height 1
        kernel, dilation, padding, stride = (1, *module.kernel_size), (1, *module.dilation), (0, *padding), (1, *module.stride)
        return F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
    return F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def padded(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """The input as the convolution reads it where it pads with its own values (``padding_mode``
    circular, reflect or replicate: then padded here, and :func:`zero_padding` adds none), else
    the input itself."""
    if module.padding_mode == "zeros":
        return inputs
    return F.pad(inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode)


def zero_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """The zeros per side the convolution adds to the input :func:`padded` gives (see :func:`numeric_padding`)."""
    return (0,) * len(module.kernel_size) if module.padding_mode != "zeros" else numeric_padding(module)


def numeric_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """Return the zero padding per side as numbers (``"same"`` and ``"valid"`` resolved), or
    ``None`` for ``"same"`` padding that is not the same on both sides (an even kernel extent)."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    extents = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    return tuple(e // 2 for e in extents) if all(e % 2 == 0 for e in extents) else None


def unfoldable(module: nn.Module) -> bool:
    """Whether a convolution is one that :func:`unfold` covers (one group; zero padding the same on
    both sides, or padding with its own values)."""
    return module.groups == 1 and zero_padding(module) is not None


class NumericPadding:
    """Mixin for a BackPACK rule of a convolution: runs it with ``padding="same"`` or ``"valid"``
    given as numbers, as BackPACK's convolution derivatives need (they compute with the padding).

    Only for the rule's call; the layer computes the same either way. An even "same" extent has
    no symmetric equivalent; the model check refuses such layers before (see ``support``).
    """

    def __call__(self, extension: object, module: nn.Module, g_inp: tuple, g_out: tuple) -> None:
        padding = module.padding
        if isinstance(padding, str) and numeric_padding(module) is not None:
            module.padding = numeric_padding(module)
        try:
            super().__call__(extension, module, g_inp, g_out)
        finally:
            module.padding = padding
