"""Per-sample gradients of Linear, convolution and normalisation layers from output-gradient hooks (no BackPACK).

A sample's gradients of such a layer follow from the layer's input and the gradient of the mean
loss with respect to its output, ``delta`` (``[N, C_out, ...]``):

- a Linear or convolution weight's are the factored :class:`FactoredLinear` / :class:`FactoredConv`
  sources, the same that BackPACK's BatchGrad rules of :mod:`factored_gradients` hand out;
- a normalisation weight's (layer, group and RMS norm; batch norm with its running statistics,
  in eval mode) are ``delta_i`` times the normalised input, summed over the positions;
- a bias's are ``delta_i`` summed over the output positions, ``[N, C_out]`` (BackPACK's
  ``grad_batch``: the gradients of the mean loss, ``g_i / N``).

Tensor hooks see the gradient of the layer's output as it left the layer, also where an in-place
operation changes the output afterwards (``ReLU(inplace=True)``, ``out += identity``).

A forward hook keeps each layer's input and hooks its output tensor; the tensor's gradient hook
hands the layer's sources to a callback while the backward pass runs. Where every tracked
parameter sits in such a layer and no curvature is due, this replaces BackPACK's module backward
hooks, which wrap each hooked layer's inputs and outputs in extra autograd nodes at every step.

With :attr:`OutputGradientHooks.at_gradients` set, a parameter's source waits for the parameter's
gradient instead (a hook that runs once autograd has accumulated it) and goes to the callback
with that gradient: the mean of the per-sample gradients, which then need not be formed a second
time from the factors.

Where the products ``G[i] . u`` with a direction are all a step needs (Alpha's second point),
:attr:`OutputGradientHooks.layer_callback` gets each layer's input and output gradient instead,
and :func:`layer_products` takes the products of the weight and the bias together: one pass of
the layer with ``u`` as its parameters.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cockpit_cli.instruments.convolutions import padded, zero_padding
from cockpit_cli.instruments.factored_batch_grad import factored_layer
from cockpit_cli.instruments.factored_gradients import FactoredConv, FactoredLinear, FactoredSamples, StackedPositions, embedding_samples, factorable_embedding
from cockpit_cli.instruments.model_hooks import ModelHook
from cockpit_cli.instruments.normalization_layers import LAST_DIMENSIONS, NORMALIZATION, normalised

# (layer, parameter, its per-sample gradients, their mean where known, else None)
ParameterSource = Callable[[nn.Module, nn.Parameter, Tensor | FactoredSamples, Tensor | None], None]
# (layer, its input, the gradient of the mean loss for its output)
LayerFactors = Callable[[nn.Module, Tensor, Tensor], None]


class OutputGradientHooks:
    """Hooks that hand a layer's per-sample gradient sources to :attr:`callback` during backward.

    Args:
        params: For each hooked layer (Linear, Conv1d or unfoldable Conv2d), its tracked
            parameters (``weight`` and / or ``bias``).
    """

    def __init__(self, params: dict[nn.Module, list[nn.Parameter]]):
        self.params = params
        self.callback: ParameterSource | None = None  # set only while a tracked backward pass runs
        self.layer_callback: LayerFactors | None = None  # in place of callback: a layer's factors, once per run of the layer
        self.paused = False  # while the engine differentiates the graph (or computes the loss again) before the training's backward pass
        self.at_gradients = False  # whether sources wait for their parameter's accumulated gradient
        self.after_gradient: Callable[[nn.Parameter], None] | None = None  # told once a parameter's gradient is complete
        self._waiting: dict[nn.Parameter, list[tuple[nn.Module, Tensor, Tensor]]] = {}  # factors, until the gradient
        self._runs_ahead: dict[int, int] = {}  # by the parameter's id: runs of its layers whose backward is still to come
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Install the forward hooks and the gradient hooks (before a tracked forward pass)."""
        if not self._handles:
            self._handles = [module.register_forward_hook(ModelHook(self._forward)) for module in self.params]
            self._handles += [param.register_post_accumulate_grad_hook(ModelHook(self._accumulated)) for params in self.params.values() for param in params]

    def detach(self) -> None:
        """Remove the hooks (output hooks already set die with their graph)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._waiting, self._runs_ahead = {}, {}

    def flush(self) -> None:
        """Hand over the sources still waiting (a gradient that never came) with no mean, or drop
        them where no callback is set (a backward pass that failed)."""
        waiting, self._waiting, self._runs_ahead = self._waiting, {}, {}
        for param, entries in waiting.items():
            if self.callback is not None:
                self._hand_over(param, entries, None)

    def _forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad and not self.paused:
            # The hook lives as long as the graph, which the caller's outputs keep after the backward
            # pass: it holds the layer's input only until it runs, as autograd does.
            output.register_hook(partial(self._backward, module, [inputs[0]]))
            for param in self.params[module]:
                self._runs_ahead[id(param)] = self._runs_ahead.get(id(param), 0) + 1

    def _backward(self, module: nn.Module, held: list[Tensor], grad_output: Tensor) -> None:
        if self.paused:  # another pass through the graph before the training's: the input stays for it
            return
        inputs = held.pop() if held else None
        if inputs is not None and self.layer_callback is not None:
            with torch.no_grad():
                self.layer_callback(module, inputs, grad_output)
            return
        if self.callback is None or inputs is None:
            return
        for param in self.params[module]:
            ahead = self._runs_ahead.get(id(param), 1) - 1
            self._runs_ahead[id(param)] = ahead
            # A layer that runs more than once (or layers that share the parameter) adds every run's
            # part to each sample's gradient: the parts wait for each other, until the gradient.
            if self.at_gradients or ahead > 0 or param in self._waiting:
                self._waiting.setdefault(param, []).append((module, inputs, grad_output))
            else:
                self._hand_over(param, [(module, inputs, grad_output)], None)

    def _accumulated(self, param: nn.Parameter) -> None:
        entries = self._waiting.pop(param, None)
        if entries is not None and self.callback is not None:
            # The accumulated gradient is the mean of the per-sample gradients where it started empty.
            self._hand_over(param, entries, param.grad.detach() if self.at_gradients else None)
        self._runs_ahead.pop(id(param), None)
        if self.after_gradient is not None:  # every source of the parameter has been handed over
            self.after_gradient(param)

    def _hand_over(self, param: nn.Parameter, entries: list[tuple[nn.Module, Tensor, Tensor]], mean: Tensor | None) -> None:
        with torch.no_grad():  # the backward pass may be recording a graph of the gradients
            runs = [layer_samples(module, param, inputs, grad_output) for module, inputs, grad_output in entries]
            self.callback(entries[0][0], param, runs[0] if len(runs) == 1 else combined_runs(runs), mean)


def combined_runs(runs: list[Tensor | FactoredSamples]) -> Tensor | FactoredSamples:
    """Return the per-sample gradients of a parameter that several layer runs share: the sum of
    the runs' (a weight's factors side by side, :class:`StackedPositions`; a bias's blocks added)."""
    return StackedPositions(runs) if isinstance(runs[0], FactoredSamples) else sum(runs)


NORMALIZATIONS = (_BatchNorm, *NORMALIZATION)


def hooked_layer(module: nn.Module) -> bool:
    """Whether hooks on the layer's output give its per-sample gradients: Linear and the
    convolutions :func:`factored_batch_grad.factored_layer` covers, and normalisation layers that
    treat every sample alone: group, layer and RMS norm, and batch norm with its running statistics
    (in eval mode: in training mode it mixes the samples and the per-sample quantities are off)."""
    if isinstance(module, _BatchNorm):
        return module.track_running_stats
    if isinstance(module, nn.Embedding):
        return factorable_embedding(module)
    return factored_layer(module) or isinstance(module, NORMALIZATION)


def layer_samples(module: nn.Module, param: nn.Parameter, inputs: Tensor, grad_output: Tensor) -> Tensor | FactoredSamples:
    """Return the per-sample gradients of the mean loss for ``param`` of ``module``.

    Args:
        module: A layer that :func:`hooked_layer` covers.
        param: Its weight or bias.
        inputs: The layer's input ``[N, ...]``.
        grad_output: ``delta``, the gradient of the mean loss for the layer's output ``[N, ...]``.

    Returns:
        A Linear or convolution weight's factored source, or the ``[N, D]`` block of another
        parameter (``D`` its elements).
    """
    inputs, grad_output = _in_precision(inputs, grad_output, param.dtype)
    if param is module.weight:
        if isinstance(module, nn.Embedding):  # G[i] = sum_l e_(id_il) delta_il^T: a Linear layer's factors with the one-hot ids as its output's
            return embedding_samples(module, inputs, grad_output)
        if isinstance(module, NORMALIZATIONS):  # delta_i times the normalised input, summed over the positions
            return _over_positions(module, grad_output * normalised(module, inputs))
        if isinstance(module, nn.Linear):
            return FactoredLinear(inputs, grad_output, module.weight.shape)
        return FactoredConv(module, grad_output, inputs)
    return _over_positions(module, grad_output)  # the bias: delta_i summed over the positions


def _in_precision(inputs: Tensor, grad_output: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The layer's floating-point input and output gradient in the parameters' precision (under
    autocast the layer ran in half precision); token ids stay as they are."""
    if inputs.is_floating_point() and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    return inputs, grad_output if grad_output.dtype == dtype else grad_output.to(dtype)


def _over_positions(module: nn.Module, values: Tensor) -> Tensor:
    """Sum each sample's values of the layer's output over the positions that share its
    parameters: ``[N, D]``, ``D`` the elements of a parameter. A Linear layer's features and a
    layer and RMS norm's normalised dimensions are the last, a convolution's and the other
    normalisations' channels the second (``[N, C, *spatial]``)."""
    n = values.shape[0]
    if values.dim() == 2:
        return values
    if isinstance(module, nn.Linear):
        return values.reshape(n, -1, values.shape[-1]).sum(1)
    if isinstance(module, LAST_DIMENSIONS):
        return values.reshape(n, -1, *module.normalized_shape).sum(1).reshape(n, -1)
    return values.reshape(n, values.shape[1], -1).sum(2)


def layer_products(module: nn.Module, inputs: Tensor, grad_output: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Return the products of each sample's gradients of the layer's weight and bias (those of the
    mean loss, ``g_i / N``) with a direction ``(U_w, U_b)``, summed over both, ``[N]``.

    The weight's product is ``delta_i . (U_w applied to x_i)`` and the bias's ``delta_i . U_b``
    at every output position, so together they are ``delta_i`` times the layer's output for the
    input ``x_i`` with ``U_w`` and ``U_b`` as its parameters: one pass of the layer, one product.

    Args:
        module: A layer that :func:`hooked_layer` covers.
        inputs: The layer's input ``[N, ...]`` (an Embedding's ids).
        grad_output: ``delta``, the gradient of the mean loss for the layer's output ``[N, ...]``.
        weight: ``U_w`` (the weight's shape), or ``None`` where the weight is not tracked.
        bias: ``U_b`` (the bias's shape), or ``None`` where the layer has no tracked bias.
    """
    inputs, grad_output = _in_precision(inputs, grad_output, (weight if weight is not None else bias).dtype)
    if isinstance(module, nn.Embedding):  # delta_il . U[id_il], none at padding_idx
        outputs = F.embedding(inputs, weight)
        if module.padding_idx is not None:
            outputs = outputs.masked_fill_((inputs == module.padding_idx).unsqueeze(-1), 0.0)
        return outputs.mul_(grad_output).reshape(len(outputs), -1).sum(1)
    if weight is None:
        return _over_positions(module, grad_output) @ bias.reshape(-1)
    if isinstance(module, nn.Linear):
        outputs = F.linear(inputs, weight, bias)
    elif isinstance(module, NORMALIZATIONS):
        outputs = normalised(module, inputs, weight, bias)
    else:
        convolution = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        outputs = convolution(padded(module, inputs), weight, bias, module.stride, zero_padding(module), module.dilation, module.groups)
    return outputs.mul_(grad_output).sum(tuple(range(1, outputs.dim())))  # in place: one temporary of the output's size
