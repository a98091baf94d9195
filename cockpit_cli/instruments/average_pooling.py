"""BackPACK's curvature rules of average pooling, in the precision of the model.

BackPACK backpropagates a curvature factor through ``AvgPool{1,2,3}d`` with a (transposed)
convolution layer it builds in torch's default precision, float32: for a model in float64 (or
bfloat16) the backward pass raised at the pooling layer. Here the same products are formed with
the functional convolutions and a kernel in the factor's precision:

    J mat   = conv(mat, 1 / K)              (each channel alone, the pooling's stride and padding)
    J^T mat = conv_transpose(mat, 1 / K)    (to the input's size)

with ``K`` the number of the kernel's elements.
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.avgpoolnd import AvgPoolNDDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn
from torch.nn import functional as F

POOLING = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
CONVOLUTIONS = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}


def _per_dimension(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def averaging_obstacle(module: nn.Module) -> str | None:
    """Why the curvature rules cannot backpropagate through the layer, an average pooling that
    divides by another count than its kernel's or whose windows pass the end; or ``None``."""
    if not isinstance(module, tuple(POOLING)):
        return None
    for option, plain in (("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)):
        value = getattr(module, option, plain)  # AvgPool1d has no divisor_override
        if value != plain:
            return f"averages with {option}={value!r}, which BackPACK's curvature rules cannot backpropagate"
    return None


class AveragePoolingDerivatives(AvgPoolNDDerivatives):
    """BackPACK's derivatives of average pooling, in the precision of what they multiply."""

    def _pooling(self, module: nn.Module, mat: Tensor) -> tuple[Tensor, Tensor, dict[str, tuple[int, ...]]]:
        """``mat`` ``[V, N, C, *spatial]`` as one-channel maps ``[V * N * C, 1, *spatial]``, the
        averaging kernel in its precision, and the pooling's stride and padding."""
        self.check_parameters(module)
        kernel_size = _per_dimension(module.kernel_size, self.N)
        stride = _per_dimension(module.stride if module.stride else module.kernel_size, self.N)
        kernel = torch.full((1, 1, *kernel_size), 1.0 / math.prod(kernel_size), dtype=mat.dtype, device=mat.device)
        return mat.flatten(0, 2).unsqueeze(1), kernel, {"stride": stride, "padding": _per_dimension(module.padding, self.N)}

    def _jac_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor) -> Tensor:
        """``J mat`` for ``mat`` ``[V, N, C, *spatial_in]``: ``[V, N, C, *spatial_out]``."""
        maps, kernel, geometry = self._pooling(module, mat)
        pooled = CONVOLUTIONS[self.N][0](maps, kernel, **geometry)
        return pooled.reshape(*mat.shape[:3], *pooled.shape[2:])

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J^T mat`` for ``mat`` ``[V, N, C, *spatial_out]``: ``[V, N, C, *spatial_in]``."""
        maps, kernel, geometry = self._pooling(module, mat)
        size_in = module.input0.shape[2:]
        reach = [(size - 1) * stride - 2 * padding + extent for size, stride, padding, extent in zip(maps.shape[2:], geometry["stride"], geometry["padding"], kernel.shape[2:])]
        spread = CONVOLUTIONS[self.N][1](maps, kernel, output_padding=tuple(s - r for s, r in zip(size_in, reach)), **geometry)
        return spread.reshape(*mat.shape[:3], *size_in)


def set_average_pooling_rules(extension: BackpropExtension, hessian: bool) -> None:
    """Give the curvature ``extension`` (the Hessian's where ``hessian``, else a GGN's) the rules
    above for every average pooling layer."""
    for module, dims in POOLING.items():
        rule = (DiagHBaseModule if hessian else DiagGGNBaseModule)(derivatives=AveragePoolingDerivatives(dims))
        extension.set_module_extension(module, rule, overwrite=True)
