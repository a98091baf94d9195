"""Curvature rules of layers without parameters that BackPACK has none for, through autograd.

Adaptive max pooling, softmax, local response normalisation, a model's own modules that reshape
or permute, ...: a layer without parameters that treats every sample alone passes the curvature
factor's columns (``[V, N, *output]``) back as

    J^T mat = the gradient of layer(x) . mat with respect to x, at the layer's input x

through the layer's own computation (autograd; computed again from the input the layer kept,
which must give its output again: a layer that draws random numbers or keeps a state cannot be
followed). That is the generalised Gauss-Newton's rule. The Hessian's adds the layer's second
derivative: none where the gradient does not depend on the input (an affine layer, such as a
reshaping or a permutation: autograd then records no dependence), otherwise, per sample, the
Hessian ``R_n`` of ``g_n . layer(x_n)`` with respect to ``x_n`` (``g`` the loss's gradient at the
output), from Hessian-vector products of all samples at once (the layer treats them alone, so
the batch's Hessian is block diagonal), split by its eigendecomposition into a positive and a
negative part: a column per element of a sample's input each.
"""

from __future__ import annotations

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.hessian_from_ggn import passed_back_with_residual

# Layers without parameters that draw random numbers in training mode (not to be computed again)
RANDOM_IN_TRAINING = (nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)


def autograd_obstacle(module: nn.Module) -> str | None:
    """Why the rules of this module cannot follow ``module`` (a layer no BackPACK rule knows), or
    ``None``: they need a layer without parameters or sublayers, which is no loss and does not
    draw random numbers."""
    if list(module.children()) or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return "has no BackPACK curvature rule"
    if isinstance(module, _Loss):
        return "has no BackPACK curvature rule"
    if isinstance(module, RANDOM_IN_TRAINING) and module.training:
        return "draws random numbers in training mode, which the curvature's rules cannot draw again"
    return None


class AutogradLayerDerivatives(BaseDerivatives):
    """BackPACK's derivatives of a layer without parameters, through autograd at its input."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        """Whether the layer's gradient does not depend on its input (unknown before the layer
        kept an input: then ``False``)."""
        if getattr(module, "input0", None) is None:
            return False
        return _gradient_with_graph(module, None)[1] is None

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J^T mat`` for ``mat`` ``[V, N, *output]``: ``[V, N, *input]``."""
        point, outputs = _computed_again(module)
        return _batched_gradient(outputs, point, mat)


def unreproducible(module: nn.Module) -> str | None:
    """Say why the layer's kept output cannot be computed again from its kept input (a layer that
    draws random numbers or keeps a state), or return ``None``. Call it after a forward pass with
    BackPACK's hooks on (they keep the input and output)."""
    try:
        _computed_again(module)
    except NotImplementedError as error:
        return str(error)
    return None


def _computed_again(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Return the layer's kept input as a leaf that requires gradients and its output computed
    again from it (the layer's own computation, not its hooks), checked against the kept output."""
    with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
        point = module.input0.detach().requires_grad_()
        outputs = module.forward(point)
    kept = getattr(module, "output", None)
    if kept is not None and not torch.equal(outputs.detach(), kept.detach()):
        raise NotImplementedError("its output, computed again from its input, differs (it draws random numbers or keeps a state)")
    return point, outputs


def _gradient_with_graph(module: nn.Module, grad_output: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Return the layer's kept input (a leaf) and the gradient of ``layer(x) . g`` with respect to
    it, with its graph (``g``: ``grad_output``, ones where ``None``); ``None`` in its place where the
    gradient does not depend on the input (autograd records no dependence: an affine layer)."""
    point, outputs = _computed_again(module)
    with torch.enable_grad():
        weights = torch.ones_like(outputs) if grad_output is None else grad_output
        (gradient,) = torch.autograd.grad(outputs, point, grad_outputs=weights, create_graph=True, allow_unused=True)
    return point, gradient if gradient is not None and gradient.requires_grad else None


def _batched_gradient(outputs: Tensor, point: Tensor, columns: Tensor, create_graph: bool = False) -> Tensor:
    """Return the gradients of ``outputs . column`` with respect to ``point`` for every column
    (``[V, *outputs.shape]`` -> ``[V, *point.shape]``), all at once where autograd can batch them."""
    with torch.enable_grad():
        try:
            (gradients,) = torch.autograd.grad(outputs, point, grad_outputs=columns, retain_graph=True, is_grads_batched=True, allow_unused=True, create_graph=create_graph)
        except RuntimeError:  # an operation vmap cannot batch: a column at a time
            gradients = torch.stack(
                [_zero_if_none(torch.autograd.grad(outputs, point, grad_outputs=column, retain_graph=True, allow_unused=True, create_graph=create_graph)[0], point) for column in columns]
            )
    return _zero_if_none(gradients, point, leading=columns.shape[0])


def _zero_if_none(gradient: Tensor | None, point: Tensor, leading: int | None = None) -> Tensor:
    if gradient is not None:
        return gradient
    shape = point.shape if leading is None else (leading, *point.shape)
    return torch.zeros(shape, dtype=point.dtype, device=point.device)


def autograd_residual(module: nn.Module, grad_output: Tensor) -> list[tuple[Tensor, float]]:
    """Return the factors of the layer's second derivative with their signs, ``[(factor, sign)]``,
    each ``[D, N, *input]`` (module docstring), or none for an affine layer.

    Args:
        module: The layer, with its kept input ``module.input0`` (``[N, *input]``).
        grad_output: ``g``, the loss's gradient at the output, ``[N, *output]``.
    """
    point, gradient = _gradient_with_graph(module, grad_output)
    if gradient is None:
        return []
    n, size = point.shape[0], point[0].numel()
    units = torch.eye(size, dtype=point.dtype, device=point.device).unsqueeze(1).expand(size, n, size).reshape(size, *point.shape)
    columns = _batched_gradient(gradient, point, units)  # [D, N, *input]: column j of every sample's Hessian
    hessians = columns.reshape(size, n, size).permute(1, 2, 0)  # [N, D, D]: row i, column j
    hessians = (hessians + hessians.transpose(1, 2)) / 2  # symmetric up to rounding
    eigenvalues, eigenvectors = torch.linalg.eigh(hessians)  # [N, D], [N, D, D]: column k the k-th vector
    factors = []
    for sign in (1.0, -1.0):
        scaled = eigenvectors * (sign * eigenvalues).clamp(min=0).sqrt().unsqueeze(1)  # [N, D(element), D(k)]
        factors.append((scaled.permute(2, 0, 1).reshape(size, *point.shape), sign))
    return factors


class AutogradHessian(DiagHBaseModule):
    """DiagHessian's rule of a layer without parameters: the factors pass back through ``J^T``
    and the layer's second derivative (:func:`autograd_residual`) is added."""

    def __init__(self) -> None:
        super().__init__(derivatives=AutogradLayerDerivatives())

    def backpropagate(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: dict) -> dict:
        return passed_back_with_residual(self, ext, module, g_inp, g_out, backproped, autograd_residual(module, g_out[0]))


class AutogradGGN(DiagGGNBaseModule):
    """DiagGGN's rule (exact and Monte-Carlo) of a layer without parameters: ``J^T`` by autograd."""

    def __init__(self) -> None:
        super().__init__(derivatives=AutogradLayerDerivatives())


AUTOGRAD_RULES = (AutogradHessian, AutogradGGN)


def set_autograd_rules(extension: BackpropExtension, hessian: bool, layers: set[type]) -> None:
    """Give ``extension`` (DiagHessian where ``hessian``, else DiagGGNExact or DiagGGNMC) the
    rules above for each class of ``layers`` that has no rule yet."""
    known = module_rules(extension)
    for layer in layers:
        if layer not in known:
            rule = AutogradHessian() if hessian else AutogradGGN()
            extension.set_module_extension(layer, rule)
