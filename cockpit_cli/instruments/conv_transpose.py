"""BackPACK's rules of transposed convolutions, for layers that pad their output as well.

A transposed convolution with ``output_padding`` (``ConvTranspose2d(c, c, 3, stride=2,
padding=1, output_padding=1)``, the upsampling layer of decoders and U-Nets, or one called with
``output_size``) gives an output longer than its kernel's reach from the input. BackPACK's rules
unfold the layer's input as if there were no output padding, so the patches have fewer positions
than the output gradient, and its per-sample and curvature rules of the weight raised inside the
backward pass. Here the input is unfolded to the output the layer gave (its padding read off the
shapes of its input and output), with the same products afterwards:

    weight gradient of sample n = sum_l  x_n[:, l] (x) dy_n[:, l]      per group

with ``x_n`` the unfolded input ``[C_in / G * K, L]`` (``K`` kernel elements, ``L`` output
positions) and ``dy_n`` the output's gradient (or a curvature factor's column) ``[C_out / G, L]``.
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.conv_transposend import ConvTransposeNDDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.secondorder.diag_ggn.convtransposend import DiagGGNConvTransposeND
from backpack.extensions.secondorder.diag_hessian.convtransposend import DiagHConvTransposeND
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from unfoldNd import unfold_transposeNd

from cockpit_cli.instruments import row_blocks

TRANSPOSED = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
TransposedConv = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def output_padding(module: TransposedConv) -> tuple[int, ...]:
    """The padding the layer's last call added to the end of each spatial dimension of its output,
    from the shapes BackPACK stored (``module.input0``, ``module.output``)."""
    padding = []
    for dim, (size_in, size_out) in enumerate(zip(module.input0.shape[2:], module.output.shape[2:])):
        reach = (size_in - 1) * module.stride[dim] - 2 * module.padding[dim] + module.dilation[dim] * (module.kernel_size[dim] - 1) + 1
        padding.append(size_out - reach)
    return tuple(padding)


def unfolded_input(module: TransposedConv, inputs: Tensor) -> Tensor:
    """The patches of ``inputs`` (``[N, C_in, *spatial_in]``) that each output position of the
    layer reads, ``[N, C_in * K, L]`` (``K`` kernel elements, ``L`` output positions)."""
    return unfold_transposeNd(
        inputs, module.kernel_size, stride=module.stride, padding=module.padding, output_padding=output_padding(module), dilation=module.dilation
    )


def _grouped(module: TransposedConv, inputs: Tensor) -> Tensor:
    """The unfolded input as ``[N, G, C_in / G, K, L]``."""
    patches = unfolded_input(module, inputs)
    return patches.reshape(patches.shape[0], module.groups, -1, module.weight.shape[2:].numel(), patches.shape[-1])


class TransposedConvDerivatives(ConvTransposeNDDerivatives):
    """BackPACK's derivatives of a transposed convolution, whose weight Jacobian follows the output
    the layer gave (output padding included)."""

    def _weight_jac_t_mat_prod(
        self, module: TransposedConv, g_inp: tuple, g_out: tuple, mat: Tensor, sum_batch: bool = True, subsampling: list[int] | None = None
    ) -> Tensor:
        """``J_w^T mat`` for ``mat`` ``[V, N, C_out, *spatial_out]``: ``[V, *w.shape]``, or
        ``[V, N, *w.shape]`` per sample."""
        patches = _grouped(module, subsample(module.input0, subsampling=subsampling))  # [N, G, C/G, K, L]
        columns, samples = mat.shape[:2]
        mat = mat.reshape(columns, samples, module.groups, -1, patches.shape[-1])  # [V, N, G, O/G, L]
        if sum_batch:
            return torch.einsum("ngckl,vngol->vgcok", patches, mat).reshape(columns, *module.weight.shape)
        return torch.einsum("ngckl,vngol->vngcok", patches, mat).reshape(columns, samples, *module.weight.shape)


def _weight_diagonal(module: TransposedConv, factor: Tensor) -> Tensor:
    """``sum_v sum_n (J_w^T S_vn)^2`` of a curvature factor ``S`` ``[V, N, C_out, *spatial_out]``,
    shaped like the weight (a few samples' products at a time)."""
    derivatives = TransposedConvDerivatives(len(module.kernel_size))
    columns, samples = factor.shape[:2]
    rows = max(1, row_blocks.CHUNK_ELEMENTS // (columns * module.weight.numel()))  # [V, rows, *w.shape] at a time
    diagonal = torch.zeros_like(module.weight)
    for start in range(0, samples, rows):
        chosen = list(range(start, min(start + rows, samples)))
        products = derivatives._weight_jac_t_mat_prod(module, (), (), factor[:, chosen], sum_batch=False, subsampling=chosen)
        diagonal += products.square_().sum((0, 1))
    return diagonal


class _GGNTransposedConv(DiagGGNConvTransposeND):
    """DiagGGN's rules of a transposed convolution, output padding included."""

    def weight(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Tensor) -> Tensor:
        return _weight_diagonal(module, backproped)


class _HessianTransposedConv(DiagHConvTransposeND):
    """DiagHessian's rules of a transposed convolution, output padding included."""

    def weight(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: dict) -> Tensor:
        diagonal = torch.zeros_like(module.weight)
        for factor, sign in zip(backproped["matrices"], backproped["signs"]):
            diagonal.add_(_weight_diagonal(module, factor), alpha=sign)
        return diagonal


def set_transposed_conv_rules(extension: BackpropExtension, rule: str) -> None:
    """Give ``extension`` the rules above for every transposed convolution: ``rule`` is
    ``"batch_grad"``, ``"ggn"`` (exact or Monte-Carlo) or ``"hessian"``."""
    for module, dims in TRANSPOSED.items():
        derivatives = TransposedConvDerivatives(dims)
        if rule == "batch_grad":
            extension.set_module_extension(module, BatchGradBase(derivatives=derivatives, params=["bias", "weight"]), overwrite=True)
        else:
            rules = {"ggn": _GGNTransposedConv, "hessian": _HessianTransposedConv}
            extension.set_module_extension(module, rules[rule](derivatives=derivatives, params=["bias", "weight"]), overwrite=True)
