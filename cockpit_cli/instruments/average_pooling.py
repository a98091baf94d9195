"""Curvature rules of average pooling, plain and adaptive, for every option, size and precision.

BackPACK backpropagates a curvature factor through ``AvgPool{1,2,3}d`` with a transposed
convolution layer it builds in torch's default precision (float32: for a float64 or bfloat16
model the backward pass raised there), as if every window were whole and divided by the kernel's
size (``ceil_mode``, ``count_include_pad=False`` and ``divisor_override`` gave wrong shapes or
raised), and ``AdaptiveAvgPool{1,2,3}d`` only where the input's size is a multiple of the
output's. Average pooling is linear in its input and treats every channel of every sample alone,
so the factor's columns, as one-channel maps ``[V * N * C, 1, *spatial]``, pass it as

    J mat   = pool(mat)
    J^T mat = the gradient of pool(x) . mat with respect to x (autograd; the same for every x)

through the layer's own computation, whatever its options.
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

POOLING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _as_maps(mat: Tensor) -> Tensor:
    """``[V, N, C, *spatial]`` as one-channel maps ``[V * N * C, 1, *spatial]``."""
    return mat.flatten(0, 2).unsqueeze(1)


class AveragePoolingDerivatives(BaseDerivatives):
    """BackPACK's derivatives of an average pooling layer, through the layer's own computation."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        return True  # linear

    def _jac_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor) -> Tensor:
        """``J mat`` for ``mat`` ``[V, N, C, *spatial_in]``: ``[V, N, C, *spatial_out]``."""
        pooled = module.forward(_as_maps(mat))  # not its hooks, which would store these tensors
        return pooled.reshape(*mat.shape[:3], *pooled.shape[2:])

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J^T mat`` for ``mat`` ``[V, N, C, *spatial_out]``: ``[V, N, C, *spatial_in]``."""
        maps = _as_maps(mat)
        size_in = module.input0.shape[2:]
        with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
            point = torch.zeros(maps.shape[0], 1, *size_in, dtype=mat.dtype, device=mat.device, requires_grad=True)
            (spread,) = torch.autograd.grad(module.forward(point), point, grad_outputs=maps)
        return spread.reshape(*mat.shape[:3], *size_in)


def set_average_pooling_rules(extension: BackpropExtension, hessian: bool) -> None:
    """Give the curvature ``extension`` (the Hessian's where ``hessian``, else a GGN's) the rules
    above for every average pooling layer."""
    for module in POOLING:
        rule = (DiagHBaseModule if hessian else DiagGGNBaseModule)(derivatives=AveragePoolingDerivatives())
        extension.set_module_extension(module, rule, overwrite=True)
