"""BackPACK's rules of layer norm and group norm, which it has none for: per-sample gradients and
the GGN's curvature diagonal (exact and Monte-Carlo).

Both normalise every sample alone (layer norm over its last dimensions, group norm over groups of
channels), then scale and shift elementwise: ``y = x_hat * w + b`` with ``x_hat`` the normalised
input. A column ``m`` of the curvature factor at the output (``[N, *output]``) then gives, per
sample,

    J_w^T m = sum over the positions w is shared by of m * x_hat        (shaped like w)
    J_b^T m = sum over the same positions of m
    J_x^T m = the gradient of y . m with respect to x                   (autograd, sample by sample alike)

The normalisation is not linear in its input, and its second derivative is not diagonal: the
Hessian's rules, which need one or the other, are not given (a model with these layers gets the
GGN's diagonal only).
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from torch.nn import functional as F

NORMALIZATION = (nn.LayerNorm, nn.GroupNorm)


def normalised(module: nn.LayerNorm | nn.GroupNorm, inputs: Tensor) -> Tensor:
    """``x_hat``, the layer's input normalised before its scale and shift."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
    return F.group_norm(inputs, module.num_groups, None, None, module.eps)


def _shared_axes(module: nn.LayerNorm | nn.GroupNorm, mat: Tensor) -> tuple[int, ...]:
    """The axes of ``mat`` (``[V, N, *output]``) that a parameter is shared along: between the
    samples and the normalised dimensions (layer norm), the spatial ones (group norm)."""
    if isinstance(module, nn.LayerNorm):
        return tuple(range(2, mat.dim() - len(module.normalized_shape)))
    return tuple(range(3, mat.dim()))


class NormalizationDerivatives(BaseParameterDerivatives):
    """BackPACK's derivatives of ``nn.LayerNorm`` and ``nn.GroupNorm``."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        return False

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J_x^T mat`` for ``mat`` ``[V, N, *output]``: ``[V, N, *input]``, a column at a time."""
        with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
            point = subsample(module.input0, subsampling=subsampling).detach().requires_grad_()
            outputs = module.forward(point)  # not its hooks, which would store these tensors
            columns = [torch.autograd.grad(outputs, point, grad_outputs=column, retain_graph=True)[0] for column in mat]
        return torch.stack(columns)

    def _weight_jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, sum_batch: bool = True, subsampling: list[int] | None = None) -> Tensor:
        """``J_w^T mat``: ``[V, N, *w.shape]``, or ``[V, *w.shape]`` summed over the samples."""
        products = mat * normalised(module, subsample(module.input0, subsampling=subsampling))
        return self._per_parameter(module, products, sum_batch)

    def _bias_jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, sum_batch: bool = True, subsampling: list[int] | None = None) -> Tensor:
        """``J_b^T mat``: ``[V, N, *b.shape]``, or ``[V, *b.shape]`` summed over the samples."""
        return self._per_parameter(module, mat, sum_batch)

    def _per_parameter(self, module: nn.Module, products: Tensor, sum_batch: bool) -> Tensor:
        axes = _shared_axes(module, products)
        reduced = products.sum(axes) if axes else products
        return reduced.sum(1) if sum_batch else reduced


def set_normalization_rules(extension: BackpropExtension, rule: str) -> None:
    """Give ``extension`` the rules above for layer and group norm: ``rule`` is ``"batch_grad"``
    or ``"ggn"`` (exact or Monte-Carlo)."""
    for module in NORMALIZATION:
        if rule == "batch_grad":
            extension.set_module_extension(module, BatchGradBase(derivatives=NormalizationDerivatives(), params=["bias", "weight"]), overwrite=True)
        else:
            extension.set_module_extension(module, DiagGGNBaseModule(derivatives=NormalizationDerivatives(), params=["bias", "weight"], sum_batch=True), overwrite=True)
