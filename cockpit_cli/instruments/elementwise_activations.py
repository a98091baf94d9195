"""Curvature rules for the elementwise activations BackPACK has none for (GELU, SiLU, Softplus, ...).

An activation that maps every element alone, ``y_i = f(x_i)``, has a diagonal Jacobian and a
diagonal Hessian: the curvature factor passes it as ``f'(x) * S`` (the GGN's and the Hessian's),
and the Hessian adds the residual ``f''(x) * dL/dy``. BackPACK's rules of ReLU, Sigmoid, Tanh
and a few more spell ``f'`` and ``f''`` out; those of the activations of transformers and modern
convolutional networks are missing, so such a model got no curvature diagonal. Here ``f'`` and
``f''`` come from autograd, at the layer's stored input: for an elementwise ``f``, the gradient
of ``sum_i f(x_i)`` is ``f'(x)``, and the gradient of ``sum_i f'(x_i)`` is ``f''(x)``. Only
torch's own elementwise activation classes get the rule (a layer of the user's may mix elements).
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.elementwise import ElementwiseDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

ELEMENTWISE = (
    nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.CELU, nn.Softsign, nn.Tanhshrink,
    nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Softshrink, nn.Hardshrink, nn.Threshold,
    nn.Identity,  # the GGN's rules know it, the Hessian's do not
)  # fmt: skip
# f'' = 0 wherever it exists (torch has no double backward of some: Hardsigmoid)
PIECEWISE_LINEAR = (nn.Hardtanh, nn.Hardsigmoid, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.Identity)


def elementwise_derivatives(module: nn.Module, inputs: Tensor, second: bool) -> Tensor:
    """``f'(x)`` of the activation ``module`` at ``inputs`` (any shape), or ``f''(x)`` where
    ``second``, in the inputs' shape and precision (zero where ``f`` is linear)."""
    if second and isinstance(module, PIECEWISE_LINEAR):
        return torch.zeros_like(inputs)
    with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
        point = inputs.detach().requires_grad_()
        outputs = module.forward(point.clone())  # not its hooks (BackPACK's would store these tensors); in place on the copy
        (first,) = torch.autograd.grad(outputs.sum(), point, create_graph=second)
        if not second:
            return first
        if not first.requires_grad:  # f' does not depend on x: piecewise linear
            return torch.zeros_like(inputs)
        (curvature,) = torch.autograd.grad(first.sum(), point, allow_unused=True)
    return torch.zeros_like(inputs) if curvature is None else curvature


class AutogradElementwiseDerivatives(ElementwiseDerivatives):
    """BackPACK's derivatives of an elementwise activation, ``f'`` and ``f''`` from autograd."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        """Whether ``f'' = 0``: the Hessian's rules then add no residual factor (whose columns,
        one per element of the layer's output, are most of the Hessian diagonal's cost)."""
        return isinstance(module, PIECEWISE_LINEAR)

    def df(self, module: nn.Module, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        return elementwise_derivatives(module, subsample(module.input0, subsampling=subsampling), second=False)

    def d2f(self, module: nn.Module, g_inp: tuple, g_out: tuple) -> Tensor:
        return elementwise_derivatives(module, module.input0, second=True)


def set_elementwise_rules(extension: BackpropExtension, hessian: bool) -> None:
    """Give the curvature ``extension`` (the Hessian's where ``hessian``, else a GGN's) the rule
    above for every activation of :data:`ELEMENTWISE`."""
    for module in ELEMENTWISE:
        rule = (DiagHBaseModule if hessian else DiagGGNBaseModule)(derivatives=AutogradElementwiseDerivatives())
        extension.set_module_extension(module, rule, overwrite=True)
