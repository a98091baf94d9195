"""Per-sample gradients of Linear and convolution layers from output-gradient hooks (no BackPACK).

A sample's gradients of a Linear or convolution layer follow from the layer's input and the
gradient of the mean loss with respect to its output, ``delta`` (``[N, C_out, ...]``):

- the weight's are the factored :class:`FactoredLinear` / :class:`FactoredConv` sources, the same
  that BackPACK's BatchGrad rules of :mod:`factored_gradients` hand out;
- the bias's are ``delta_i`` summed over the output positions, ``[N, C_out]`` (BackPACK's
  ``grad_batch``: the gradients of the mean loss, ``g_i / N``).

A forward hook keeps each layer's input and hooks its output tensor; the tensor's gradient hook
hands the layer's sources to a callback while the backward pass runs. Where every tracked
parameter sits in such a layer and no curvature is due, this replaces BackPACK's module backward
hooks, which wrap each hooked layer's inputs and outputs in extra autograd nodes at every step.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from cockpit_cli.instruments.factored_gradients import FactoredConv, FactoredLinear, FactoredSamples

LayerSources = Callable[[nn.Module, list[Tensor | FactoredSamples]], None]


class OutputGradientHooks:
    """Hooks that hand a layer's per-sample gradient sources to :attr:`callback` during backward.

    Args:
        params: For each hooked layer (Linear, Conv1d or unfoldable Conv2d), its tracked
            parameters (``weight`` and / or ``bias``), in the order the callback receives sources.
    """

    def __init__(self, params: dict[nn.Module, list[nn.Parameter]]):
        self.params = params
        self.callback: LayerSources | None = None  # set only while a tracked backward pass runs
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Install the forward hooks (before a tracked forward pass)."""
        if not self._handles:
            self._handles = [module.register_forward_hook(self._forward) for module in self.params]

    def detach(self) -> None:
        """Remove the forward hooks (output hooks already set die with their graph)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, module, inputs[0]))

    def _backward(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> None:
        if self.callback is not None:
            with torch.no_grad():  # the backward pass may be recording a graph of the gradients
                self.callback(module, [layer_samples(module, param, inputs, grad_output) for param in self.params[module]])


def layer_samples(module: nn.Module, param: nn.Parameter, inputs: Tensor, grad_output: Tensor) -> Tensor | FactoredSamples:
    """Return the per-sample gradients of the mean loss for ``param`` of ``module``.

    Args:
        module: A Linear or convolution layer.
        param: Its weight or bias.
        inputs: The layer's input ``[N, ...]``.
        grad_output: ``delta``, the gradient of the mean loss for the layer's output ``[N, ...]``.

    Returns:
        The weight's factored source, or the bias's ``[N, C_out]`` block.
    """
    if param is module.weight:
        if isinstance(module, nn.Linear):
            return FactoredLinear(inputs, grad_output, module.weight.shape)
        return FactoredConv(module, grad_output, inputs)
    if isinstance(module, nn.Linear):  # delta: [N, *, out]
        return grad_output if grad_output.dim() == 2 else grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).sum(1)
    return grad_output.flatten(2).sum(2)  # convolution, delta: [N, C_out, *spatial]
