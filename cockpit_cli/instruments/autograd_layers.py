"""Curvature rules of layers that BackPACK has none for, through autograd.

Adaptive max pooling, softmax, local response normalisation, a model's own modules that reshape
or permute, layers with parameters (PReLU, a layer of one's own), layers with sublayers that
a model's graph calls as one layer, taken whole (``nn.TransformerEncoderLayer``, self-attention,
a block of the model's own: :mod:`curvature_graph`), and the operations of a model's forward
the graph calls as layers (:mod:`tensor_operations`): a layer that treats every sample alone
passes the curvature factor's columns (``[V, N, *output]``) back as

    J^T mat = the gradient of layer(x) . mat with respect to x, at the layer's input x

through the layer's own computation (autograd; computed again from the input the layer kept,
which must give its output again: a layer that draws random numbers or keeps a state cannot be
followed; attention's fused kernels may sum in another order: up to rounding). That is the
generalised Gauss-Newton's rule. The Hessian's adds the layer's second derivative: none where
the gradient does not depend on the input (an affine layer, such as a reshaping or a
permutation: autograd then records no dependence; a piecewise linear one, whose recorded
dependence has a zero derivative: a product with a random vector is zero), otherwise, per sample, the
Hessian ``R_n`` of ``g_n . layer(x_n)`` with respect to ``x_n`` (``g`` the loss's gradient at the
output), from Hessian-vector products of all samples at once (the layer treats them alone, so
the batch's Hessian is block diagonal), split by its eigendecomposition into a positive and a
negative part: a column per element of a sample's input each.

A parameter ``theta`` of such a layer gets, from each factor column ``s`` (with its sign), the
squares of ``J_theta(x_n)^T s_n``, the gradient of ``layer(x_n) . s_n`` with respect to
``theta`` for every sample ``n`` alone (``torch.func``: ``vmap`` over the samples and the
columns, a block of columns at a time), summed over samples and columns: the GGN's diagonal.
The Hessian's adds the layer's own second derivative in its parameters, the diagonal of the
Hessian of ``g . layer(x)`` with respect to ``theta`` (``g`` the loss's gradient at the output):
none where the output is linear in ``theta`` (PReLU's slopes), otherwise one Hessian-vector
product per element of ``theta``, 64 at a time, for layers of at most :data:`OWN_PRODUCTS_MOST`
such parameters (second derivatives on attention's math kernel: its fused kernels have none).
BackPACK's loop over a layer's parameters reads only its own attributes: the rules store the
values of every parameter, their sublayers' too, themselves (:class:`_WithParameters`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule
from backpack.extensions.secondorder.diag_hessian.diag_h_base import DiagHBaseModule
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.loss import _Loss

from cockpit_cli.instruments.extension_rules import module_rules
from cockpit_cli.instruments.functional_passes import diagonal_by_products
from cockpit_cli.instruments.hessian_from_ggn import passed_back_with_residual

# Layers without parameters that draw random numbers in training mode (not to be computed again)
RANDOM_IN_TRAINING = (nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)
OWN_PRODUCTS_MOST = 4096  # a layer's parameters whose own second derivative (the Hessian's) may come from products
_GRADIENT_ELEMENTS = 1 << 22  # per-sample, per-column parameter gradients held at once (16 MiB of float32)


def autograd_obstacle(module: nn.Module, whole: bool = False) -> str | None:
    """Why the rules of this module cannot follow ``module`` (a layer no BackPACK rule knows), or
    ``None``: they need a layer without buffers, which is no loss, does not draw random numbers
    and, with parameters, computes them in its forward pass itself; a layer with sublayers (and
    buffers) only ``whole``, where the model's graph calls it as one layer
    (``nn.TransformerEncoderLayer``, a block of the model's own)."""
    if list(module.children()) and not whole:
        return "has no BackPACK curvature rule"
    if not whole and any(True for _ in module.buffers()):  # (a whole layer's, such as a causal mask, stay: its output computed again is checked)
        return "keeps buffers (a state), which the curvature's rules of layers BackPACK does not know cannot follow"
    if isinstance(module, _Loss):
        return "has no BackPACK curvature rule"
    if any(isinstance(part, RANDOM_IN_TRAINING) and part.training for part in module.modules()):
        return "draws random numbers in training mode, which the curvature's rules cannot draw again"
    if whole and any(part.training and _dropout(part) > 0 for part in module.modules()):
        return "drops out in training mode, which the curvature's rules cannot draw again sample by sample (dropout 0, or eval mode, gives the curvature)"
    if any(isinstance(part, nn.MultiheadAttention) and not part.batch_first for part in module.modules()):
        return "takes the samples along its second dimension (batch_first=False), which the curvature's rules cannot take apart (batch_first=True gives the curvature)"
    if any(isinstance(part, nn.Embedding) and part.max_norm is not None for part in module.modules()):
        return "renormalises embedding rows in its forward pass (max_norm), a change of its parameters the curvature's rules cannot follow"
    if any(part._forward_pre_hooks and any(True for _ in part.parameters(recurse=False)) for part in module.modules()):
        return "changes its parameters in a forward pre-hook (such as torch.nn.utils.weight_norm's), which the curvature's rules cannot follow"
    return None


def attention_obstacle(module: nn.Module) -> str | None:
    """Why the Hessian's rules cannot follow ``module``, which holds attention, or ``None``:
    attention's output is not linear in its parameters, whose own second derivative takes a
    Hessian-vector product per parameter, for at most :data:`OWN_PRODUCTS_MOST` of them."""
    count = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if count <= OWN_PRODUCTS_MOST or not any(isinstance(part, nn.MultiheadAttention) for part in module.modules()):
        return None
    return (
        f"holds attention, whose output is not linear in its {count} parameters: their Hessian diagonal would take a "
        f"Hessian-vector product each (at most {OWN_PRODUCTS_MOST}); curvature: ggn gives the GGN's diagonal"
    )


def _dropout(module: nn.Module) -> float:
    """The dropout probability of a dropout layer or of attention's weights, else 0."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    return float(module.dropout) if isinstance(module, nn.MultiheadAttention) else 0.0


class AutogradLayerDerivatives(BaseDerivatives):
    """BackPACK's derivatives of a layer BackPACK does not know, through autograd at its input."""

    def hessian_is_zero(self, module: nn.Module) -> bool:
        """Whether the layer's gradient does not depend on its input (unknown before the layer
        kept an input: then ``False``)."""
        if getattr(module, "input0", None) is None:
            return False
        return _gradient_with_graph(module, None)[1] is None

    def _jac_t_mat_prod(self, module: nn.Module, g_inp: tuple, g_out: tuple, mat: Tensor, subsampling: list[int] | None = None) -> Tensor:
        """``J^T mat`` for ``mat`` ``[V, N, *output]``: ``[V, N, *input]``, the columns batched by
        autograd, or where an operation cannot be batched so, as samples of a larger batch."""
        point, outputs = _computed_again(module)
        try:
            return _batched_gradient(outputs, point, mat, one_at_a_time=False)
        except RuntimeError:
            return torch.cat([_as_samples(module, block) for block in mat.split(max(1, _GRADIENT_ELEMENTS // max(1, mat[0].numel())))])


def _as_samples(module: nn.Module, mat: Tensor) -> Tensor:
    """``J^T mat`` (``[V, N, *output]`` -> ``[V, N, *input]``) from one backward pass of the layer
    on its input repeated once per column: the layer treats every sample alone."""
    columns = mat.shape[0]
    point = module.input0.detach()
    with torch.enable_grad():
        stacked = point.repeat(columns, *([1] * (point.dim() - 1))).requires_grad_()  # [V * N, *input]
        outputs = _layer_at(module, stacked)
        (gradient,) = torch.autograd.grad(outputs, stacked, grad_outputs=mat.reshape(outputs.shape), allow_unused=True)
    return _zero_if_none(gradient, stacked).reshape(columns, *point.shape)


def unreproducible(module: nn.Module) -> str | None:
    """Say why the layer's kept output cannot be computed again from its kept input (a layer that
    draws random numbers or keeps a state), or return ``None``. Call it after a forward pass with
    BackPACK's hooks on (they keep the input and output)."""
    try:
        _computed_again(module)
    except NotImplementedError as error:
        return str(error)
    return None


def _computed_again(module: nn.Module, check: bool = True) -> tuple[Tensor, Tensor]:
    """Return the layer's kept input as a leaf that requires gradients and its output computed
    again from it (the layer's own computation, not its hooks, with its parameters held fixed),
    checked against the kept output (unless not ``check``)."""
    with torch.enable_grad():  # BackPACK's rules run without gradients, inside the backward pass
        point = module.input0.detach().requires_grad_()
        outputs = _layer_at(module, point)
    kept = getattr(module, "output", None)
    if check and kept is not None and not _same(outputs.detach(), kept.detach()):
        raise NotImplementedError("its output, computed again from its input, differs (it draws random numbers or keeps a state)")
    return point, outputs


def _same(computed: Tensor, kept: Tensor) -> bool:
    """Whether the output computed again is the kept one, up to rounding: a kernel may sum in
    another order (attention's, where the first pass's inputs required gradients and these do
    not), within the square root of the precision of the largest output; what draws random
    numbers or keeps a state differs by far more."""
    if computed.shape != kept.shape:
        return False
    if not computed.is_floating_point():
        return torch.equal(computed, kept)
    tolerance = torch.finfo(kept.dtype).eps ** 0.5
    scale = float(kept.abs().amax()) if kept.numel() else 0.0
    return bool(torch.isclose(computed, kept, rtol=tolerance, atol=tolerance * scale, equal_nan=True).all())


def _layer_at(module: nn.Module, point: Tensor) -> Tensor:
    """The layer's own computation (not its hooks) at ``point``, its parameters held fixed."""
    fixed = {f"layer.{name}": param.detach() for name, param in module.named_parameters()}
    return functional_call(_OwnComputation(module), fixed, (point,)) if fixed else module.forward(point)


def _curved(gradient: Tensor, point: Tensor) -> bool:
    """Whether ``gradient`` (a gradient with its graph) changes with ``point``: its product with a
    random vector is not exactly zero. A piecewise linear layer (PReLU) records a dependence whose
    derivative is zero."""
    probe = torch.rand(gradient.shape, generator=torch.Generator().manual_seed(0), dtype=gradient.dtype).add_(0.5).to(gradient.device)  # (training's random state untouched)
    with torch.enable_grad():
        (product,) = torch.autograd.grad(gradient, point, grad_outputs=probe, retain_graph=True, allow_unused=True)
    return product is not None and bool(product.ne(0).any())


def _gradient_with_graph(module: nn.Module, grad_output: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Return the layer's kept input (a leaf) and the gradient of ``layer(x) . g`` with respect to
    it, with its graph (``g``: ``grad_output``, ones where ``None``); ``None`` in its place where the
    gradient does not depend on the input (autograd records no dependence: an affine layer)."""
    with sdpa_kernel(SDPBackend.MATH):  # attention's fused kernels have no second derivative (same values, up to rounding)
        point, outputs = _computed_again(module, check=False)
    with torch.enable_grad():
        weights = torch.ones_like(outputs) if grad_output is None else grad_output
        (gradient,) = torch.autograd.grad(outputs, point, grad_outputs=weights, create_graph=True, allow_unused=True)
    return point, gradient if gradient is not None and gradient.requires_grad and _curved(gradient, point) else None


def _batched_gradient(outputs: Tensor, point: Tensor, columns: Tensor, create_graph: bool = False, one_at_a_time: bool = True) -> Tensor:
    """Return the gradients of ``outputs . column`` with respect to ``point`` for every column
    (``[V, *outputs.shape]`` -> ``[V, *point.shape]``), all at once where autograd can batch them,
    else a column at a time (or, without ``one_at_a_time``, autograd's error)."""
    with torch.enable_grad():
        try:
            (gradients,) = torch.autograd.grad(outputs, point, grad_outputs=columns, retain_graph=True, is_grads_batched=True, allow_unused=True, create_graph=create_graph)
        except RuntimeError:  # an operation vmap cannot batch: a column at a time
            if not one_at_a_time:
                raise
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


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the layer's parameters that train (its sublayers' too, where the layer is taken whole)."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


class _OwnComputation(nn.Module):
    """Runs a layer's own computation (``forward``, not its hooks) for ``functional_call``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layer.forward(inputs)


def squared_parameter_gradients(module: nn.Module, factors: list[tuple[Tensor, float]], names: list[str]) -> dict[str, Tensor]:
    """Return, per named parameter, ``sum_k sign_k sum_{v, n} (J_theta(x_n)^T S_k[v, n])^2``
    (module docstring), the parameter's shape.

    Args:
        module: The layer, with its kept input ``module.input0`` (``[N, *input]``).
        factors: ``[(S, sign)]``, each ``S`` ``[V, N, *output]``.
        names: The parameters (the layer's, its sublayers' too, by their dotted names).
    """
    own = _OwnComputation(module)
    params = {name: module.get_parameter(name).detach() for name in names}
    inputs = module.input0.detach()

    def projected(theta: dict[str, Tensor], sample: Tensor, column: Tensor) -> Tensor:
        return (functional_call(own, {f"layer.{name}": value for name, value in theta.items()}, (sample.unsqueeze(0),)).squeeze(0) * column).sum()

    per_sample = vmap(vmap(grad(projected), in_dims=(None, 0, 0)), in_dims=(None, None, 0))  # over columns, then samples
    totals = {name: torch.zeros_like(value) for name, value in params.items()}
    size = inputs.shape[0] * max(1, sum(value.numel() for value in params.values()))
    for factor, sign in factors:
        for block in factor.split(max(1, _GRADIENT_ELEMENTS // size)):
            with torch.enable_grad():
                gradients = per_sample(params, inputs, block)
            for name, gradient in gradients.items():
                totals[name].add_(gradient.square().sum((0, 1)), alpha=sign)
    return totals


def own_second_derivative(module: nn.Module, grad_output: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Return the diagonal of the Hessian of ``g . layer(x)`` with respect to each named
    parameter (``g``: ``grad_output``, ``[N, *output]``), for the parameters the output is not
    linear in (the others have none).

    Raises:
        NotImplementedError: Where more than :data:`OWN_PRODUCTS_MOST` parameters would take a
            Hessian-vector product each.
    """
    theta = {name: module.get_parameter(name).detach().requires_grad_() for name in names}
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # (as in _gradient_with_graph)
        outputs = functional_call(_OwnComputation(module), {f"layer.{name}": value for name, value in theta.items()}, (module.input0.detach(),))
        gradients = torch.autograd.grad((outputs * grad_output).sum(), list(theta.values()), create_graph=True, allow_unused=True)
    curved = {name: gradient for name, gradient in zip(theta, gradients) if gradient is not None and gradient.requires_grad and _curved(gradient, theta[name])}
    count = sum(theta[name].numel() for name in curved)
    if count > OWN_PRODUCTS_MOST:
        raise NotImplementedError(
            f"the output of the layer {type(module).__name__} is not linear in its {count} parameters, whose Hessian diagonal would take a Hessian-vector product each "
            f"(at most {OWN_PRODUCTS_MOST}); curvature: ggn gives the GGN's diagonal"
        )
    return {name: diagonal_by_products(theta[name].detach(), partial(_batched_gradient, gradient, theta[name])) for name, gradient in curved.items()}


def _set_parameter_values(rule: Any, extension: BackpropExtension, module: nn.Module, g_out: tuple) -> None:
    """Store ``rule``'s values of the layer's parameters (its sublayers' too) where BackPACK's
    rules keep theirs, from the quantity backpropagated to the layer's output (BackPACK's own
    loop over parameters reads only the layer's own attributes)."""
    names = trainable_names(module)
    if not names:
        return
    backproped = extension.saved_quantities.retrieve_quantity(module.output.data_ptr(), delete_old=False)
    for name, value in rule.parameter_values(module, g_out, backproped, names).items():
        setattr(module.get_parameter(name), extension.savefield, value)


class _WithParameters:
    """A rule that stores its layer's parameter values itself (:func:`_set_parameter_values`) before BackPACK's call."""

    def __call__(self, extension: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple) -> None:
        _set_parameter_values(self, extension, module, g_out)
        super().__call__(extension, module, g_inp, g_out)  # type: ignore[misc]


class AutogradHessian(_WithParameters, DiagHBaseModule):
    """DiagHessian's rule of a layer BackPACK does not know: the factors pass back through
    ``J^T`` and the layer's second derivative in its input (:func:`autograd_residual`) is added;
    its parameters get the factors' squared parameter gradients and their own second derivative
    (:func:`own_second_derivative`)."""

    def __init__(self) -> None:
        super().__init__(derivatives=AutogradLayerDerivatives())

    @staticmethod
    def parameter_values(module: nn.Module, g_out: tuple, backproped: dict, names: list[str]) -> dict[str, Tensor]:
        totals = squared_parameter_gradients(module, list(zip(backproped["matrices"], backproped["signs"])), names)
        for name, diagonal in own_second_derivative(module, g_out[0], names).items():
            totals[name].add_(diagonal)
        return totals

    def backpropagate(self, ext: BackpropExtension, module: nn.Module, g_inp: tuple, g_out: tuple, backproped: dict) -> dict:
        return passed_back_with_residual(self, ext, module, g_inp, g_out, backproped, autograd_residual(module, g_out[0]))


class AutogradGGN(_WithParameters, DiagGGNBaseModule):
    """DiagGGN's rule (exact and Monte-Carlo) of a layer BackPACK does not know: ``J^T`` by
    autograd, and its parameters the squares of the factor's parameter gradients."""

    def __init__(self) -> None:
        super().__init__(derivatives=AutogradLayerDerivatives())

    @staticmethod
    def parameter_values(module: nn.Module, g_out: tuple, backproped: Tensor, names: list[str]) -> dict[str, Tensor]:
        return squared_parameter_gradients(module, [(backproped, 1.0)], names)


AUTOGRAD_RULES = (AutogradHessian, AutogradGGN)


def set_autograd_rules(extension: BackpropExtension, hessian: bool, layers: list[nn.Module]) -> None:
    """Give ``extension`` (DiagHessian where ``hessian``, else DiagGGNExact or DiagGGNMC) the
    rules above for the class of each of ``layers`` that has no rule yet."""
    known = module_rules(extension)
    for layer_class in dict.fromkeys(type(layer) for layer in layers):
        if layer_class not in known:
            extension.set_module_extension(layer_class, AutogradHessian() if hessian else AutogradGGN())
