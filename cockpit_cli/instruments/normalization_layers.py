"""BackPACK's rules of layer norm, group norm and RMS norm, which it has none for: per-sample
gradients and the curvature diagonals (the Hessian's, and the GGN's exact and Monte-Carlo).

All normalise every sample alone (layer and RMS norm over the last dimensions, group norm over
groups of channels), then scale and shift elementwise: ``y = x_hat * w + b`` with ``x_hat`` the
normalised input (RMS norm: divided by its root mean square, not centred, and no shift). A column ``m`` of the curvature factor at the output (``[N, *output]``) then gives, per
sample,

    J_w^T m = sum over the positions w is shared by of m * x_hat        (shaped like w)
    J_b^T m = sum over the same positions of m
    J_x^T m = the gradient of y . m with respect to x                   (autograd, sample by sample alike)

The output is linear in ``w`` and ``b``, so their Hessian diagonals are the GGN's of each
factor, signed (:mod:`hessian_from_ggn`). The normalisation's second derivative is not diagonal,
so the Hessian's residual, which BackPACK's rules take as a diagonal, is formed here. Per sample
and block of ``D`` elements normalised together (a position of layer norm, a group of group
norm), with ``v = w * g`` for the output gradient ``g``, ``x_hat = (x - mean) / s`` and
``s = sqrt(var + eps)``, the second derivative of ``v . x_hat`` is

    R = alpha P + [x_hat q] C [x_hat q]^T,      P = I - 1 1^T / D,   alpha = -a / (s^2 D),
    a = v . x_hat,   q = (P v - x_hat a / D) / s,   C = [[a / (s^2 D^2), -1 / (s D)], [-1 / (s D), 0]]

(``q`` is the gradient of ``v . x_hat``). RMS norm, which does not centre, has the same with
``P = I`` (``x`` in place of ``x - mean``, ``s`` its root mean square). ``P = P P^T`` gives a column per element of the block,
scaled by ``sqrt(|alpha|)`` in the factor of alpha's sign, and ``C``, whose determinant is
negative, one positive and one negative eigenvalue: two more columns per block. Every column is
zero outside its block, as the blocks of a sample do not interact.
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.basederivatives import BaseParameterDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.batch_grad.batch_grad_base import BatchGradBase
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from torch.nn import functional as F

from cockpit_cli.instruments.hessian_from_ggn import ParameterHessianFromGGN, passed_back_with_residual

RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # (torch 2.4 on)
LAST_DIMENSIONS = (nn.LayerNorm, *RMS_NORM)  # normalise the last dimensions of each sample, the parameters' shape
NORMALIZATION = (*LAST_DIMENSIONS, nn.GroupNorm)


def normalised(module: nn.Module, inputs: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Return a normalisation layer's output for ``inputs`` with ``weight`` and ``bias`` as its
    parameters (none: ``x_hat``, the normalised input); batch norm with its running statistics."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(inputs, module.normalized_shape, weight, bias, module.eps)
    if isinstance(module, RMS_NORM):
        return F.rms_norm(inputs, module.normalized_shape, weight, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(inputs, module.num_groups, weight, bias, module.eps)
    return F.batch_norm(inputs, module.running_mean, module.running_var, weight, bias, False, 0.0, module.eps)


def _shared_axes(module: nn.Module, mat: Tensor) -> tuple[int, ...]:
    """The axes of ``mat`` (``[V, N, *output]``) that a parameter is shared along: between the
    samples and the normalised dimensions (layer and RMS norm), the spatial ones (group norm)."""
    if isinstance(module, LAST_DIMENSIONS):
        return tuple(range(2, mat.dim() - len(module.normalized_shape)))
    return tuple(range(3, mat.dim()))


class NormalizationDerivatives(BaseParameterDerivatives):
    """BackPACK's derivatives of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm``."""

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


def _blocks(module: nn.Module, values: Tensor) -> Tensor:
    """``values`` (``[N, *input]``) as ``[N, B, D]``: ``B`` blocks of ``D`` elements normalised together."""
    if isinstance(module, LAST_DIMENSIONS):
        size = math.prod(module.normalized_shape)
        return values.reshape(values.shape[0], -1, size)
    return values.reshape(values.shape[0], module.num_groups, -1)


def _scale(module: nn.Module, like: Tensor) -> Tensor | float:
    """The layer's scale ``w`` broadcastable against its output ``like`` (1.0 without one)."""
    if module.weight is None:
        return 1.0
    if isinstance(module, LAST_DIMENSIONS):
        return module.weight
    return module.weight.reshape(-1, *([1] * (like.dim() - 2)))


def normalization_residual(module: nn.Module, grad_output: Tensor) -> list[tuple[Tensor, float]]:
    """Return the factors of the layer's residual ``R`` (module docstring) with their signs:
    ``[(factor, sign)]``, each factor ``[V, N, *output]``: a column per element for ``alpha``'s
    positive and negative parts, and a column per block for ``C``'s positive and negative
    eigenvalues.

    Args:
        module: The layer, with BackPACK's stored input ``module.input0`` (``[N, *input]``).
        grad_output: ``g``, the loss's gradient at the output, ``[N, *output]``.
    """
    inputs = module.input0
    centring = not isinstance(module, RMS_NORM)
    v = _blocks(module, grad_output * _scale(module, grad_output))  # [N, B, D]
    centered = _blocks(module, inputs) - _blocks(module, inputs).mean(-1, keepdim=True) if centring else _blocks(module, inputs)
    size = centered.shape[-1]
    eps = torch.finfo(inputs.dtype).eps if module.eps is None else module.eps  # (RMS norm's default)
    s = (centered.square().mean(-1, keepdim=True) + eps).sqrt()  # [N, B, 1]
    x_hat = centered / s
    a = (v * x_hat).sum(-1, keepdim=True)
    q = ((v - v.mean(-1, keepdim=True) if centring else v) - x_hat * a / size) / s
    alpha = (-a / (s.square() * size)).squeeze(-1)  # [N, B]
    corner = -1.0 / (s * size)
    c = torch.stack([torch.cat([a * corner.square(), corner], -1), torch.cat([corner, torch.zeros_like(corner)], -1)], -2)  # [N, B, 2, 2]
    eigenvalues, eigenvectors = torch.linalg.eigh(c)  # ascending: one negative, one positive
    basis = torch.stack([x_hat, q], -1)  # [N, B, D, 2]
    vectors = (basis @ eigenvectors) * eigenvalues.abs().sqrt().unsqueeze(-2)  # [N, B, D, 2]: sqrt(|lambda_k|) [x_hat q] e_k
    n, blocks = alpha.shape
    one_per_block = torch.eye(blocks, dtype=inputs.dtype, device=inputs.device)
    centering = torch.eye(size, dtype=inputs.dtype, device=inputs.device) - (1.0 / size if centring else 0.0)  # P
    shape = (n, *grad_output.shape[1:])
    factors = []
    for sign in (1.0, -1.0):
        root = (sign * alpha).clamp(min=0).sqrt()  # [N, B]
        element_columns = torch.einsum("bc,nb,ji->bjnci", one_per_block, root, centering)  # [B, D, N, B, D]
        factors.append((element_columns.reshape(blocks * size, *shape), sign))
    for index, sign in ((1, 1.0), (0, -1.0)):
        block_columns = torch.einsum("bc,nbi->bnci", one_per_block, vectors[..., index])  # [B, N, B, D]
        factors.append((block_columns.reshape(blocks, *shape), sign))
    return factors


class NormalizationHessian(ParameterHessianFromGGN):
    """DiagHessian's rule of layer, group and RMS norm: the factors pass back through ``J_x``, the
    layer's residual (:func:`normalization_residual`) is added, and the scale's and shift's
    diagonals are the GGN's of each factor, signed."""

    def __init__(self, params: list[str]) -> None:
        derivatives = NormalizationDerivatives()
        super().__init__(DiagGGNBaseModule(derivatives=derivatives, params=params, sum_batch=True), derivatives)

    def backpropagate(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: dict) -> dict:
        return passed_back_with_residual(self, ext, module, g_inp, g_out, backproped, normalization_residual(module, g_out[0]))


def set_normalization_rules(extension: BackpropExtension, rule: str) -> None:
    """Give ``extension`` the rules above for layer, group and RMS norm: ``rule`` is ``"batch_grad"``,
    ``"ggn"`` (exact or Monte-Carlo) or ``"hessian"``."""
    for module in NORMALIZATION:
        params = ["weight"] if module in RMS_NORM else ["bias", "weight"]  # (BackPACK reads each attribute)
        if rule == "batch_grad":
            extension.set_module_extension(module, BatchGradBase(derivatives=NormalizationDerivatives(), params=params), overwrite=True)
        elif rule == "hessian":
            extension.set_module_extension(module, NormalizationHessian(params), overwrite=True)
        else:
            extension.set_module_extension(module, DiagGGNBaseModule(derivatives=NormalizationDerivatives(), params=params, sum_batch=True), overwrite=True)
