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
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from torch import Tensor, nn


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


class ReducedCrossEntropyDerivatives(CrossEntropyLossDerivatives):
    """BackPACK's cross-entropy derivatives with the ``C - 1``-column factor of :func:`reduced_sqrt_hessian`.

    Losses over extra axes (``[N, C, d1, ...]``) and sub-sampled factors keep BackPACK's.
    """

    def _sqrt_hessian(self, module: nn.CrossEntropyLoss, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        logits = module.input0
        if logits.dim() != 2 or subsampling is not None or logits.shape[1] < 2:
            return super()._sqrt_hessian(module, g_inp, g_out, subsampling=subsampling)
        self._check_2nd_order_parameters(module)
        factor = reduced_sqrt_hessian(torch.softmax(logits, dim=1))
        if module.reduction == "mean":
            factor /= math.sqrt(self._get_mean_normalization(logits))
        return factor
