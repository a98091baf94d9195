"""BackPACK's curvature-diagonal extensions, with convolution weights reduced a sample at a time.

``DiagHessian``, ``DiagGGNExact`` and ``DiagGGNMC`` backpropagate a symmetric factor ``S`` of
the loss's curvature, ``[V, N, C_out, *spatial_out]`` at a layer's output (``V`` columns: the
classes for cross-entropy, the Monte-Carlo samples for ``DiagGGNMC``). The diagonal of a
convolution weight is then

    diag = sum_v sign_v sum_n (S_vn @ x_n)^2        (elementwise square; [C_out, K])

with ``S_vn`` as ``[C_out, L]``, ``x_n`` the unfolded input patches ``[L, K]`` of sample n, and
``sign_v`` +1 except for the Hessian's negative residual terms. BackPACK forms every product
``S_vn @ x_n`` at once, a ``[V, N, C_out, K]`` tensor (hundreds of MiB on CIFAR-10 models),
then squares and sums it; here the products of one sample (or a few small ones) are formed,
squared and summed while they are in cache. The numbers are the same; the time of the layer's
diagonal falls by about a third and its memory by the size of that tensor. Convolutions that
:func:`~convolutions.unfold` does not cover, and all other layers, keep BackPACK's rules, except:
transposed convolutions, whose rules follow their output padding (:mod:`conv_transpose`); layers
that are linear maps without parameters (average pooling, padding, upsampling), whose rules go
through the layers' own computation (:mod:`linear_layers`); layer and group norm, which get the
GGN's rules (:mod:`normalization_layers`); elementwise activations BackPACK has no rules for,
which get them from autograd (:mod:`elementwise_activations`); and embeddings, whose tables'
diagonals come from the rows their ids touch (:mod:`embedding_curvature`). The Hessian's factors
carry their origins, so that they add up where the branches of a graph meet, and the layers
affine in their input and parameters (sums, scalings, batch norm in eval mode) get the Hessian's
rules from the GGN's (:mod:`hessian_from_ggn`).
The convolution rules also accept ``padding="same"`` (see :class:`~convolutions.NumericPadding`)
and padding with the layer's own values (circular, reflect, replicate: the factor passes back
through the layer's own computation, the patches are those of the padded input),
cross-entropy starts the backpropagation with a factor of one column fewer than classes
(:mod:`cross_entropy_factor`), and the losses' factors follow their options (class weights,
ignored targets, label smoothing), binary cross-entropy's, the squared error's and the robust
regression losses' (Huber, smooth L1, L1) for outputs of any shape included
(:mod:`elementwise_loss_factor`).
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.custom_module.branching import SumModule
from backpack.custom_module.permute import Permute
from backpack.custom_module.scale_module import ScaleModule
from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.convnd import DiagGGNConvND
from backpack.extensions.secondorder.diag_ggn.dropout import DiagGGNDropout
from backpack.extensions.secondorder.diag_ggn.losses import DiagGGNCrossEntropyLoss, DiagGGNLoss
from backpack.extensions.secondorder.diag_hessian.convnd import DiagHConvND
from backpack.extensions.secondorder.diag_hessian.dropout import DiagHDropout
from backpack.extensions.secondorder.diag_hessian.losses import DiagHCrossEntropyLoss, DiagHLoss
from torch import Tensor, nn

from cockpit_cli.instruments import row_blocks
from cockpit_cli.instruments.autograd_layers import autograd_obstacle, set_autograd_rules
from cockpit_cli.instruments.conv_transpose import set_transposed_conv_rules
from cockpit_cli.instruments.convolutions import NumericPadding, unfold, unfoldable
from cockpit_cli.instruments.cross_entropy_factor import ReducedCrossEntropyDerivatives
from cockpit_cli.instruments.elementwise_activations import set_elementwise_rules
from cockpit_cli.instruments.embedding_curvature import set_embedding_rules
from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.graph_hessian import BranchingDiagHessian, tag_origins
from cockpit_cli.instruments.hessian_from_ggn import set_affine_layer_rules
from cockpit_cli.instruments.elementwise_loss_factor import BinaryCrossEntropyDerivatives, RobustRegressionDerivatives, SquaredErrorDerivatives
from cockpit_cli.instruments.linear_layers import set_linear_layer_rules, transposed_product
from cockpit_cli.instruments.normalization_layers import set_normalization_rules

CURVATURES = {
    "hessian": (BranchingDiagHessian, "diag_h"),
    "ggn": (DiagGGNExact, "diag_ggn_exact"),
    "ggn_mc": (DiagGGNMC, "diag_ggn_mc"),
}
# Affine in their input and parameters: the Hessian's rules are the GGN's (hessian_from_ggn)
AFFINE_LAYERS = (SumModule, ScaleModule, Permute, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # BackPACK's dropout rule reads the mask from the output


def conv_weight_diagonal(module: nn.Conv1d | nn.Conv2d, factor: Tensor) -> Tensor:
    """Return ``sum_v sum_n (S_vn @ x_n)^2`` for a convolution weight, shaped like the weight.

    Args:
        module: The convolution (one group), with BackPACK's stored input ``module.input0``
            (``[N, C_in, *spatial]``).
        factor: ``S``, the backpropagated curvature factor at the output,
            ``[V, N, C_out, *spatial_out]``.
    """
    columns, n, out_channels = factor.shape[:3]
    factor = factor.reshape(columns, n, out_channels, -1)  # [V, N, C_out, L]
    patch_size = module.weight[0].numel()  # K = C_in * prod(kernel)
    diagonal = torch.zeros(out_channels, patch_size, dtype=factor.dtype, device=factor.device)
    rows = max(1, row_blocks.CHUNK_ELEMENTS // (columns * out_channels * patch_size))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        patches = unfold(module, module.input0[start:stop]).transpose(1, 2)  # [b, L, K]
        products = torch.matmul(factor[:, start:stop], patches)  # [V, b, C_out, K]
        diagonal += products.square_().sum((0, 1))
    return diagonal.reshape(module.weight.shape)


class _HessianConv(NumericPadding, DiagHConvND):
    """DiagHessian's rules of a convolution, the weight's diagonal a sample at a time."""

    def weight(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: dict) -> Tensor:
        if not unfoldable(module):
            return super().weight(ext, module, g_inp, g_out, backproped)
        diagonal = torch.zeros_like(module.weight)
        for factor, sign in zip(backproped["matrices"], backproped["signs"]):
            diagonal.add_(conv_weight_diagonal(module, factor), alpha=sign)
        return diagonal


class _GGNConv(NumericPadding, DiagGGNConvND):
    """DiagGGN's rules of a convolution, the weight's diagonal a sample at a time."""

    def weight(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: Tensor) -> Tensor:
        if not unfoldable(module):
            return super().weight(ext, module, g_inp, g_out, backproped)
        return conv_weight_diagonal(module, backproped)


class _OwnPadding:
    """Mixin for BackPACK's convolution derivatives: a layer that pads with its own values
    (circular, reflect, replicate) passes a factor back through its own computation, where
    BackPACK's product pads with zeros."""

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        if module.padding_mode == "zeros":
            return super()._jac_t_mat_prod(module, g_inp, g_out, mat, subsampling=subsampling)
        return transposed_product(module, mat)


class _Conv1DDerivatives(_OwnPadding, Conv1DDerivatives):
    pass


class _Conv2DDerivatives(_OwnPadding, Conv2DDerivatives):
    pass


def curvature_extension(curvature: str, model: nn.Module | None = None, graph_layers: list[nn.Module] | None = None) -> BackpropExtension:
    """Return the BackPACK extension of ``curvature`` (``"hessian"``, ``"ggn"`` or ``"ggn_mc"``)
    with the convolution rules above and cross-entropy's factor of ``C - 1`` columns
    (:mod:`cross_entropy_factor`); the Hessian's follows graphs with branches
    (:mod:`graph_hessian`). The layers of ``model`` that no rule knows get those of
    :mod:`autograd_layers`, as do those of ``graph_layers``, which a graph of the model calls:
    layers with sublayers, taken whole, and the operations of its forward
    (:mod:`tensor_operations`)."""
    extension_class = CURVATURES[curvature][0]
    extension = extension_class()
    hessian = issubclass(extension_class, DiagHessian)
    rule = _HessianConv if hessian else _GGNConv
    for module, derivatives in ((nn.Conv1d, _Conv1DDerivatives), (nn.Conv2d, _Conv2DDerivatives)):
        extension.set_module_extension(module, rule(derivatives=derivatives(), params=["bias", "weight"]), overwrite=True)
    loss_rule = DiagHCrossEntropyLoss() if hessian else DiagGGNCrossEntropyLoss()
    loss_rule.derivatives = ReducedCrossEntropyDerivatives()
    extension.set_module_extension(nn.CrossEntropyLoss, loss_rule, overwrite=True)
    elementwise = [(nn.BCEWithLogitsLoss, BinaryCrossEntropyDerivatives), (nn.MSELoss, SquaredErrorDerivatives)]
    elementwise += [(loss, RobustRegressionDerivatives) for loss in (nn.HuberLoss, nn.SmoothL1Loss, nn.L1Loss)]
    for loss, derivatives in elementwise:
        extension.set_module_extension(loss, (DiagHLoss if hessian else DiagGGNLoss)(derivatives=derivatives()), overwrite=True)
    set_transposed_conv_rules(extension, "hessian" if hessian else "ggn")
    set_linear_layer_rules(extension, hessian)
    set_elementwise_rules(extension, hessian)
    set_embedding_rules(extension, hessian)
    if hessian:
        set_affine_layer_rules(extension, DiagGGNExact(), AFFINE_LAYERS)
    set_normalization_rules(extension, "hessian" if hessian else "ggn")
    for dropout in CHANNEL_DROPOUT:  # a mask of whole channels is a mask of elements too
        extension.set_module_extension(dropout, DiagHDropout() if hessian else DiagGGNDropout(), overwrite=True)
    if model is not None:
        unknown = [m for m in model.modules() if autograd_obstacle(m) is None] + [m for m in graph_layers or [] if autograd_obstacle(m, whole=True) is None]
        set_autograd_rules(extension, hessian, unknown)
    if hessian:
        tag_origins(extension)  # last: every rule, BackPACK's and those above
    return extension


def settings_obstacle(rule: object, module: nn.Module) -> str | None:
    """Return the setting of ``module`` that its BackPACK ``rule`` does not cover, in the words of
    the rule's derivatives, which check them ("only num_layers = 1 is supported"), or ``None``."""
    derivatives = getattr(rule, "derivatives", None) or getattr(rule, "_derivatives", None)
    check = getattr(derivatives, "_check_parameters", None)
    try:
        if check is not None:
            check(module)
    except NotImplementedError as error:
        return str(error)
    return None


def adds_residual(extension: BackpropExtension, module: nn.Module) -> bool:
    """Whether the Hessian's rule of ``module`` adds a factor of its own to the one it passes back:
    a layer with a second derivative (Tanh, GELU, ...) adds its residual, a column per element of
    its output per sample, which every earlier layer then backpropagates beside the loss's. The
    GGN's rules add none."""
    if not isinstance(extension, DiagHessian):
        return False
    rule = module_rules(extension).get(type(module))
    derivatives = getattr(rule, "derivatives", None)
    if derivatives is None:
        return False
    try:
        return not derivatives.hessian_is_zero(module)
    except NotImplementedError:
        return False
