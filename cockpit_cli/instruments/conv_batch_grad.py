"""Per-sample weight gradients of convolutions by unfolding, a faster rule for BackPACK's BatchGrad.

BackPACK forms per-sample convolution weight gradients with a grouped convolution over the
batch, which is slow on CPUs. For an ordinary convolution (one group, zero padding) the same
numbers follow from unfolding the input into patches and one batched matrix product:

    grad_W[n] = grad_out[n] (C_out x L)  @  patches[n]^T (L x C_in*k)

Everything else (biases, grouped or padded-by-mode convolutions, summed gradients) keeps
BackPACK's own rule.
"""

from __future__ import annotations

import torch.nn.functional as F
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.extensions import BatchGrad
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from torch import Tensor, nn


def _unfold(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Return the input patches ``[N, C_in * prod(kernel), L]`` the convolution multiplies."""
    if isinstance(module, nn.Conv1d):
        inputs = inputs.unsqueeze(2)  # [N, C, 1, L]: a 1-D convolution is a 2-D one of height 1
        kernel, dilation, padding, stride = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
        return F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
    return F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _supported(module: nn.Module, sum_batch: bool, subsampling: object) -> bool:
    return not sum_batch and subsampling is None and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def unfolded_weight_gradients(module: nn.Conv1d | nn.Conv2d, mat: Tensor) -> Tensor:
    """Per-sample weight gradients from output gradients.

    Args:
        module: The convolution, with BackPACK's stored input ``module.input0``.
        mat: Output gradients ``[V, N, C_out, *spatial_out]``.

    Returns:
        ``[V, N, *weight.shape]``.
    """
    patches = _unfold(module, module.input0)  # [N, K, L]
    flat = mat.reshape(mat.shape[0], mat.shape[1], mat.shape[2], -1)  # [V, N, C_out, L]
    gradients = flat.matmul(patches.transpose(1, 2).unsqueeze(0))  # [V, N, C_out, K]
    return gradients.reshape(mat.shape[0], mat.shape[1], *module.weight.shape)


class _UnfoldMixin:
    def _weight_jac_t_mat_prod(self, module, g_inp, g_out, mat, sum_batch=True, subsampling=None):  # noqa: ANN001, ANN201
        if _supported(module, sum_batch, subsampling):
            return unfolded_weight_gradients(module, mat)
        return super()._weight_jac_t_mat_prod(module, g_inp, g_out, mat, sum_batch=sum_batch, subsampling=subsampling)


class UnfoldConv1DDerivatives(_UnfoldMixin, Conv1DDerivatives):
    """BackPACK's Conv1d derivatives with the unfolded per-sample weight gradient."""


class UnfoldConv2DDerivatives(_UnfoldMixin, Conv2DDerivatives):
    """BackPACK's Conv2d derivatives with the unfolded per-sample weight gradient."""


def fast_batch_grad() -> BatchGrad:
    """Return a BatchGrad extension whose Conv1d / Conv2d rules use unfolding."""
    extension = BatchGrad()
    for module, derivatives in ((nn.Conv1d, UnfoldConv1DDerivatives()), (nn.Conv2d, UnfoldConv2DDerivatives())):
        extension.set_module_extension(module, BatchGradBase(derivatives=derivatives, params=["bias", "weight"]), overwrite=True)
    return extension
