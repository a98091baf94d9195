"""A symmetric factor of the cross-entropy loss's Hessian with one column fewer than classes.

The curvature diagonals backpropagate a factor ``S`` with ``S S^T = H_n`` for every sample,
where ``H_n = diag(p_n) - p_n p_n^T`` is the Hessian of sample n's cross-entropy with respect to
its logits (``p_n`` the softmax probabilities, ``C`` classes). BackPACK's factor
``diag(tau) (I - tau tau^T)`` (``tau = sqrt(p)``) has ``C`` columns, but ``H_n`` has rank
``C - 1`` (``H_n 1 = 0``), and every column costs one backward pass of the factor through the
network, which is most of a curvature diagonal's time.

Here ``I - tau tau^T`` is written as ``Q Q^T`` with ``Q`` an orthonormal basis ``[C, C - 1]`` of
the complement of ``tau`` (a unit vector): the columns other than ``k`` of the Householder
reflection that swaps ``tau`` and the unit vector ``e_k``. Then ``S = diag(tau) Q`` satisfies
``S S^T = diag(tau) (I - tau tau^T) diag(tau) = H_n`` exactly (up to round-off), with ``C - 1``
columns: a tenth less work for ten classes, half for two. Choosing ``k`` where ``tau`` is
smallest keeps the reflection well conditioned (``||tau - e_k||^2 >= 2 - 2 / sqrt(C)``).

Every loss of the cross-entropy family has the Hessian ``a_n (diag(p_n) - p_n p_n^T)`` with
respect to sample ``n``'s logits, whatever its options: ``a_n`` is the weight of the sample's
log-sum-exp in the loss, ``1 / N`` for the plain mean. Class weights, targets equal to
``ignore_index`` (``a_n = 0``, and the mean over the others), label smoothing with either, and
soft targets change ``a_n`` alone. BackPACK's factor assumes the plain mean (and raises for class
weights); :func:`hessian_weights` reads ``a_n`` off the loss itself, at logits of zero, where
the Hessian's first diagonal entry is ``a_n (1 / C - 1 / C^2)``, and the factor is scaled by
``sqrt(a_n)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from torch import Tensor, nn
from torch.nn import functional

from cockpit_cli.instruments.loss_output_weight import OutputWeighted


def reduced_sqrt_hessian(probs: Tensor) -> Tensor:
    """Return ``S`` (``[C - 1, N, C]``) with ``sum_v S[v, n, :] S[v, n, :]^T = diag(p_n) - p_n p_n^T``.

    Args:
        probs: Softmax probabilities ``[N, C]``, ``C >= 2``.
    """
    n, classes = probs.shape
    tau = probs.sqrt()  # [N, C], unit rows
    k = tau.argmin(dim=1)  # [N]
    u = tau.clone()
    u[torch.arange(n, device=probs.device), k] -= 1.0  # tau - e_k
    scale = 2.0 / (u * u).sum(1)  # [N]
    reflection = torch.eye(classes, dtype=probs.dtype, device=probs.device) - scale[:, None, None] * u[:, :, None] * u[:, None, :]  # [N, C, C], symmetric
    keep = torch.ones(n, classes, dtype=torch.bool, device=probs.device)
    keep[torch.arange(n, device=probs.device), k] = False
    basis = reflection[keep].reshape(n, classes - 1, classes)  # rows j != k: Q^T, [N, C - 1, C]
    return (basis * tau[:, None, :]).transpose(0, 1)  # S[v, n, c] = tau_c Q[c, v]


def hessian_weights(module: nn.CrossEntropyLoss) -> Tensor | None:
    """Return the weights ``a`` (``[N, d1, ...]``) of the positions' Hessians ``a (diag(p) - p p^T)``
    in the loss ``module`` computed at its last forward pass (its inputs as BackPACK stores them),
    or ``None`` where they are those of the plain mean, ``1 / (N d1 ...)`` (``1`` when summed).

    The loss's options (class weights, ``ignore_index``, label smoothing, probabilities as
    targets) are read from the loss itself: one Hessian-vector product at logits of zero.
    """
    logits, targets = module.input0, module.input1
    plain = module.weight is None and not targets.is_floating_point() and not bool((targets == module.ignore_index).any())
    if plain or logits.shape[1] < 2:  # one class: the Hessian is zero whatever the weights
        return None
    first_class = torch.zeros_like(logits)
    first_class[:, 0] = 1.0

    def loss_of(z: Tensor) -> Tensor:
        return functional.cross_entropy(z, targets, weight=module.weight, ignore_index=module.ignore_index, reduction=module.reduction, label_smoothing=module.label_smoothing)

    classes = logits.shape[1]
    return curvature_at_zero(loss_of, logits, first_class)[:, 0] / (1.0 / classes - 1.0 / classes**2)


def curvature_at_zero(loss_of: Callable[[Tensor], Tensor], like: Tensor, direction: Tensor) -> Tensor:
    """Return the product of the Hessian of ``loss_of`` at logits of zero (shaped like ``like``)
    with ``direction``: a loss's own weights of its positions, read off where every factor of the
    Hessian's canonical form is known."""
    zeros = torch.zeros_like(like, requires_grad=True)
    with torch.enable_grad():  # also inside a backward pass
        (slope,) = torch.autograd.grad(loss_of(zeros), zeros, create_graph=True)
        (product,) = torch.autograd.grad(slope, zeros, direction)
    return product.detach()


class ReducedCrossEntropyDerivatives(OutputWeighted, CrossEntropyLossDerivatives):
    """BackPACK's cross-entropy derivatives with the ``C - 1``-column factor of :func:`reduced_sqrt_hessian`,
    and with every option of the loss (:func:`hessian_weights`).

    Losses over extra axes (``[N, C, d1, ...]``) and sub-sampled factors keep BackPACK's factor
    of the plain mean, scaled like the others.
    """

    def _sqrt_hessian(self, module: nn.CrossEntropyLoss, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        logits = module.input0
        if logits.dim() != 2 or subsampling is not None or logits.shape[1] < 2:
            factor = super()._sqrt_hessian(module, g_inp, g_out, subsampling=subsampling)
        else:
            factor = reduced_sqrt_hessian(torch.softmax(logits, dim=1))
            if module.reduction == "mean":
                factor /= math.sqrt(self._get_mean_normalization(logits))
        return self._weighted(module, factor, subsampling)

    def _sqrt_hessian_sampled(self, module: nn.CrossEntropyLoss, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        factor = super()._sqrt_hessian_sampled(module, g_inp, g_out, mc_samples=mc_samples, subsampling=subsampling)
        return self._weighted(module, factor, subsampling)

    def _check_2nd_order_parameters(self, module: nn.CrossEntropyLoss) -> None:
        """Class weights and any ``ignore_index`` are supported (:meth:`_weighted`)."""

    def _weighted(self, module: nn.CrossEntropyLoss, factor: Tensor, subsampling: list[int] | None) -> Tensor:
        """Scale a factor of the plain mean (or sum), ``[V, N, C, d1, ...]``, to the loss's own
        weights of the positions."""
        weights = hessian_weights(module)
        if weights is None:
            return factor
        if module.reduction == "mean":
            weights = weights * self._get_mean_normalization(module.input0)
        if subsampling is not None:
            weights = weights[subsampling]
        return factor * weights.clamp(min=0.0).sqrt().unsqueeze(1).unsqueeze(0).to(factor.dtype)
