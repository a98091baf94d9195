"""Curvature rules of the layers that are linear maps of each sample and have no parameters:
average pooling (plain and adaptive), padding, upsampling, shuffles, folding and reshaping.

BackPACK backpropagates a curvature factor through a layer by the layer's Jacobian. Its rules of
average pooling build a transposed convolution layer in torch's default precision (float32: for
a float64 or bfloat16 model the backward pass raised there) as if every window were whole and
divided by the kernel's size (``ceil_mode``, ``count_include_pad=False`` and
``divisor_override`` gave wrong shapes or raised), and adaptive pooling's only where the input's
size is a multiple of the output's; padding other than with zeros, upsampling and the shuffles
have none, so a model with them got no curvature diagonal. A layer that is linear in its input
and treats every sample alone passes the factor's columns back, ``[V, N, *output]`` as a batch
of ``V * N`` outputs, as

    J^T mat = the gradient of layer(x) . mat with respect to x      (autograd; the same for every x)

through the layer's own computation, whatever its options, sizes and precision.
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn

LINEAR_LAYERS = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold, nn.Unflatten,
)  # fmt: skip


def transposed_product(module: nn.Module, mat: Tensor) -> Tensor:
    """``J^T mat`` of a layer affine in its input that treats every sample alone, for ``mat``
    ``[V, N, *output]``: ``[V, N, *input]``, the gradient of ``layer(x) . mat`` with respect to
    ``x`` (at zero: the same everywhere) through the layer's own computation."""
    batch = mat.flatten(0, 1)  # [V * N, *output]
    shape_in = module.input0.shape[1:]
    with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
        point = torch.zeros(batch.shape[0], *shape_in, dtype=mat.dtype, device=mat.device, requires_grad=True)
        (spread,) = torch.autograd.grad(module.forward(point), point, grad_outputs=batch)  # not its hooks, which would store these tensors
    return spread.reshape(*mat.shape[:2], *shape_in)


class LinearLayerDerivatives(BaseDerivatives):
    """BackPACK's derivatives of a linear layer without parameters, through its own computation."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        return True

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J^T mat`` for ``mat`` ``[V, N, *output]``: ``[V, N, *input]``."""
        return transposed_product(module, mat)


def set_linear_layer_rules(extension: BackpropExtension, hessian: bool) -> None:
    """Give the curvature ``extension`` (the Hessian's where ``hessian``, else a GGN's) the rules
    above for every layer of :data:`LINEAR_LAYERS`."""
    for module in LINEAR_LAYERS:
        rule = (DiagHBaseModule if hessian else DiagGGNBaseModule)(derivatives=LinearLayerDerivatives())
        extension.set_module_extension(module, rule, overwrite=True)
