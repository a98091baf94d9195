"""BackPACK's ``BatchGrad`` whose Linear, convolution and Embedding weight rules return factored sources.

In ``grad_batch`` such a weight holds a :class:`factored_gradients.FactoredSamples` (its inputs
and output gradients) instead of the ``[N, *weight.shape]`` tensor; biases, other layers and
convolutions that :func:`convolutions.unfold` does not cover keep BackPACK's rules.
"""

from __future__ import annotations

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.embedding import EmbeddingDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.extensions import BatchGrad
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from torch import Tensor, nn

from cockpit_cli.instruments.conv_transpose import set_transposed_conv_rules
from cockpit_cli.instruments.convolutions import NumericPadding, unfoldable
from cockpit_cli.instruments.factored_gradients import FactoredConv, FactoredLinear, FactoredSamples, embedding_samples, factorable_embedding
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


class FactorableEmbeddingDerivatives(EmbeddingDerivatives):
    """BackPACK's derivatives of an Embedding, for the layers :func:`factorable_embedding` covers
    (a ``padding_idx`` too: its row gets no gradient)."""

    def _check_parameters(self, module: nn.Embedding) -> None:
        if not factorable_embedding(module):
            super()._check_parameters(module)


class _EmbeddingWeight(BatchGradBase):
    """An Embedding's per-sample weight gradients, factored (:func:`embedding_samples`). BackPACK's
    own rule forms a float32 one-hot tensor of every id for every table row, ``[V, N, *]``, which
    fails for float64 weights and does not allow ``padding_idx``."""

    def __init__(self) -> None:
        super().__init__(derivatives=FactorableEmbeddingDerivatives(), params=["weight"])

    def weight(self, ext: BatchGrad, module: nn.Module, g_inp: tuple[Tensor], g_out: tuple[Tensor], bp_quantities: None) -> FactoredSamples:
        self._derivatives._check_parameters(module)
        return embedding_samples(module, module.input0, g_out[0].to(module.weight.dtype))


def factored_batch_grad() -> BatchGrad:
    """Return a BatchGrad extension whose Linear, Conv1d, Conv2d and Embedding weights get :class:`FactoredSamples`."""
    extension = BatchGrad()
    rules = {nn.Linear: _LinearWeight(), nn.Conv1d: _ConvWeight(Conv1DDerivatives()), nn.Conv2d: _ConvWeight(Conv2DDerivatives()), nn.Embedding: _EmbeddingWeight()}
    for module, rule in rules.items():
        extension.set_module_extension(module, rule, overwrite=True)
    set_transposed_conv_rules(extension, "batch_grad")
    set_normalization_rules(extension, "batch_grad")
    return extension
