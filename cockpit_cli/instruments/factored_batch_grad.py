"""BackPACK's ``BatchGrad`` whose Linear and convolution weight rules return factored sources.

In ``grad_batch`` such a weight holds a :class:`factored_gradients.FactoredSamples` (its inputs
and output gradients) instead of the ``[N, *weight.shape]`` tensor; biases, other layers and
convolutions that :func:`convolutions.unfold` does not cover keep BackPACK's rules.
"""

from __future__ import annotations

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.extensions import BatchGrad
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from torch import Tensor, nn

from cockpit_cli.instruments.conv_transpose import set_transposed_conv_rules
from cockpit_cli.instruments.convolutions import NumericPadding, unfoldable
from cockpit_cli.instruments.factored_gradients import FactoredConv, FactoredLinear, FactoredSamples
from cockpit_cli.instruments.normalization_layers import set_normalization_rules


def factored_layer(module: nn.Module) -> bool:
    """Whether :func:`factored_batch_grad` keeps the layer's weight gradients factored."""
    return isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and unfoldable(module))


class _FactoredWeight(BatchGradBase):
    """BackPACK's BatchGrad rules of a layer, except that the weight's is a :class:`FactoredSamples`."""

    def __init__(self, derivatives: object):
        super().__init__(derivatives=derivatives, params=["bias", "weight"])
        self._dense_weight = self._make_param_function("weight")

    def factors(self, module: nn.Module, grad_output: Tensor) -> FactoredSamples | None:
        """Return the factored per-sample gradients, or ``None`` where BackPACK's rule applies."""
        raise NotImplementedError

    def weight(self, ext: BatchGrad, module: nn.Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], bp_quantities: None) -> Tensor | FactoredSamples:
        source = self.factors(module, g_out[0]) if ext.get_subsampling() is None else None
        return source if source is not None else self._dense_weight(ext, module, g_inp, g_out, bp_quantities)


class _LinearWeight(_FactoredWeight):
    def __init__(self):
        super().__init__(LinearDerivatives())

    def factors(self, module: nn.Module, grad_output: Tensor) -> FactoredSamples | None:
        dtype = module.weight.dtype  # under autocast the layer ran in half precision
        return FactoredLinear(module.input0.to(dtype), grad_output.to(dtype), module.weight.shape)


class _ConvWeight(NumericPadding, _FactoredWeight):
    def factors(self, module: nn.Module, grad_output: Tensor) -> FactoredSamples | None:
        dtype = module.weight.dtype  # under autocast the layer ran in half precision
        return FactoredConv(module, grad_output.to(dtype), module.input0.to(dtype)) if unfoldable(module) else None


def factored_batch_grad() -> BatchGrad:
    """Return a BatchGrad extension whose Linear, Conv1d and Conv2d weights get :class:`FactoredSamples`."""
    extension = BatchGrad()
    rules = {nn.Linear: _LinearWeight(), nn.Conv1d: _ConvWeight(Conv1DDerivatives()), nn.Conv2d: _ConvWeight(Conv2DDerivatives())}
    for module, rule in rules.items():
        extension.set_module_extension(module, rule, overwrite=True)
    set_transposed_conv_rules(extension, "batch_grad")
    set_normalization_rules(extension, "batch_grad")
    return extension
