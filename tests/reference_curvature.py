"""Brute-force curvature references (Hessian, GGN, TIC, max eigenvalue) and the Alpha fit.

Dense matrices are ``[D, D]`` over all trainable parameters, flattened in
``model.parameters()`` order. The Hessian is built column by column from Hessian-vector
products (double backward); the GGN from explicit Jacobians of the model output and the
Hessian of the loss with respect to that output. Meant for models with at most a few hundred
parameters, in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reference import (
    PerSampleLoss,
    flatten,
    individual_losses,
    per_sample_gradients,
    regularizer,
    trainable,
)

LossFn = Callable[[Tensor, Tensor], Tensor]  # mean-reduced: (outputs, targets) -> scalar


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``[D]`` -> one tensor of ``p.shape`` per parameter."""
    return [chunk.view_as(p) for chunk, p in zip(vector.split([p.numel() for p in params]), params)]


def _grad_or_zeros(out: Tensor, params: Sequence[Tensor], **kwargs) -> Tensor:
    """Flat ``[D]`` gradient of ``out`` (unused parameters contribute zeros)."""
    grads = torch.autograd.grad(out, params, allow_unused=True, **kwargs)
    return _cat([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])


def _flat_gradient_with_graph(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None,
    weight_decay: float,
) -> tuple[list[nn.Parameter], Tensor]:
    """Trainable parameters and the flat gradient ``[D]`` of ``L``, with its graph kept."""
    params = trainable(model)
    loss = loss_fn(model(inputs), targets) + regularizer(regularized, weight_decay)
    return params, _grad_or_zeros(loss, params, create_graph=True)


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    vector: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> Tensor:
    """``H v`` with ``H`` the Hessian of ``L = loss_fn(model(inputs), targets) + R``.

    Args:
        vector: ``v``, shape ``[D]``.

    Returns:
        ``H v``, shape ``[D]``.
    """
    params, grad = _flat_gradient_with_graph(model, loss_fn, inputs, targets, regularized, weight_decay)
    return _grad_or_zeros(grad, params, grad_outputs=vector)


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> Tensor:
    """Dense Hessian ``[D, D]`` of ``L``: one Hessian-vector product per basis vector."""
    params, grad = _flat_gradient_with_graph(model, loss_fn, inputs, targets, regularized, weight_decay)
    basis = torch.eye(grad.numel(), dtype=grad.dtype, device=grad.device)
    columns = [_grad_or_zeros(grad, params, grad_outputs=e, retain_graph=True) for e in basis]
    return torch.stack(columns, dim=1)


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> list[Tensor]:
    """Exact diagonal of the Hessian of ``L`` (``R`` adds ``weight_decay`` on ``regularized``).

    Entry ``k`` is the derivative of the scalar gradient entry ``dL/dtheta_k`` w.r.t. ``theta_k``.

    Returns:
        One tensor of ``p.shape`` per trainable parameter.
    """
    params, grad = _flat_gradient_with_graph(model, loss_fn, inputs, targets, regularized, weight_decay)
    diag = torch.stack([_grad_or_zeros(grad[k], params, retain_graph=True)[k] for k in range(grad.numel())])
    return unflatten(diag, params)


def _regularizer_curvature(
    params: Sequence[Tensor], regularized: Sequence[Tensor] | None, weight_decay: float
) -> Tensor:
    """``[D]`` vector with ``weight_decay`` on the entries of ``regularized`` parameters."""
    ids = {id(p) for p in regularized or []}
    return _cat([torch.full_like(p, weight_decay if id(p) in ids else 0.0) for p in params]).detach()


def ggn(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
    """Dense GGN ``J^T H_f J`` ``[D, D]`` of the data loss ``loss_fn(f, targets)``, ``f = model(inputs)``.

    ``J`` ``[N*C, D]`` is the Jacobian of the flattened batch output (one backward per entry)
    and ``H_f`` ``[N*C, N*C]`` the Hessian of the loss w.r.t. that output (double backward).
    """
    params = trainable(model)
    outputs = model(inputs)
    jac = torch.stack([_grad_or_zeros(o, params, retain_graph=True) for o in outputs.reshape(-1)])
    f = outputs.detach().requires_grad_(True)
    grad_f = torch.autograd.grad(loss_fn(f, targets), f, create_graph=True)[0].reshape(-1)
    hess_f = torch.stack([_grad_or_zeros(gk, [f], retain_graph=True) for gk in grad_f])
    return jac.T @ hess_f @ jac


def ggn_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> list[Tensor]:
    """Diagonal of the exact GGN of the data loss, plus ``weight_decay`` on ``regularized``.

    Pass ``regularized=None`` for the data-loss GGN alone. The Monte-Carlo GGN is random; its
    expectation is this exact GGN.

    Returns:
        One tensor of ``p.shape`` per trainable parameter.
    """
    params = trainable(model)
    diag = ggn(model, loss_fn, inputs, targets).diagonal()
    return unflatten(diag + _regularizer_curvature(params, regularized, weight_decay), params)


def hess_trace(curvature_diagonal: Sequence[Tensor]) -> list[float]:
    """HessTrace: ``sum_d h_d`` per parameter."""
    return [h.sum().item() for h in curvature_diagonal]


def max_abs_eigenvalue(matrix: Tensor) -> float:
    """HessMaxEV: the eigenvalue of the symmetric ``matrix`` ``[D, D]`` largest in magnitude (signed)."""
    eigvals = torch.linalg.eigvalsh(matrix)
    return eigvals[eigvals.abs().argmax()].item()


def power_iteration(
    matvec: Callable[[Tensor], Tensor], dim: int, max_iter: int = 10_000, rtol: float = 1e-12, seed: int = 0
) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator from matrix-vector products ``[D] -> [D]``.

    Stops when the residual ``||A v - lambda v||`` drops below ``rtol * |lambda|``.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(dim, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    eigval = 0.0
    for _ in range(max_iter):
        av = matvec(v)
        eigval = v.dot(av).item()
        if (av - eigval * v).norm() <= rtol * abs(eigval):
            break
        v = av / av.norm()
    return eigval


def _as_flat_diagonal(curvature: Sequence[Tensor] | Tensor) -> Tensor:
    return curvature if isinstance(curvature, Tensor) else _cat(curvature)


def tic_diag(
    grads: Sequence[Tensor] | Tensor, curvature: Sequence[Tensor] | Tensor, epsilon: float = 1e-7
) -> float:
    """TICDiag: ``sum_d [(1/N) sum_i g_{i,d}^2] / (h_d + epsilon)``.

    Args:
        grads: Per-sample gradients, per parameter ``[N, *p.shape]`` or flat ``[N, D]``.
        curvature: Diagonal ``h``, per parameter (``p.shape``) or flat ``[D]``.
    """
    second_moment = flatten(grads).pow(2).mean(0)
    return (second_moment / (_as_flat_diagonal(curvature) + epsilon)).sum().item()


def tic_trace(
    grads: Sequence[Tensor] | Tensor, curvature: Sequence[Tensor] | Tensor, epsilon: float = 1e-7
) -> float:
    """TICTrace: ``sum_d (1/N) sum_i g_{i,d}^2 / (sum_d h_d + epsilon)``."""
    second_moment = flatten(grads).pow(2).mean(0)
    return (second_moment.sum() / (_as_flat_diagonal(curvature).sum() + epsilon)).item()


# --- Alpha: noisy quadratic fit along the update direction ------------------------------------


def alpha_from_observations(
    t: float, fs: Sequence[float], dfs: Sequence[float], var_fs: Sequence[float], var_dfs: Sequence[float]
) -> float:
    """Alpha from ``f(0), f(t)``, slopes ``f'(0), f'(t)`` and their variances (zeros -> 1e-10).

    Fits ``q(x) = mu0 + mu1 x + mu2 x^2`` by weighted least squares with weights
    ``1 / variance``. A concave fit (``mu2 < 0``), a linear one (``mu2 == 0``) or ``t == 0``
    gives -1; otherwise ``t / x_min - 1 = 2 t / (-mu1 / mu2) - 1`` with ``x_min = -mu1 / (2 mu2)``
    the fit's minimiser: 0 means the step landed in the minimum, 1 on the opposite side at the
    same height.
    """
    if t == 0.0:
        return -1.0
    variances = np.array([v if v != 0 else 1e-10 for v in [*var_fs, *var_dfs]], dtype=np.float64)
    # Rows: what each observation sees of (mu0, mu1, mu2).
    design = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
    observations = np.array([*fs, *dfs], dtype=np.float64)
    # Minimises sum_k (design_k . mu - y_k)^2 / var_k, i.e. solves the normal equations
    # (Phi Lambda^-1 Phi^T) mu = Phi Lambda^-1 y, through the better-conditioned scaled system.
    scale = 1.0 / np.sqrt(variances)
    mu = np.linalg.lstsq(scale[:, None] * design, scale * observations, rcond=None)[0]
    if mu[2] <= 0:
        return -1.0
    with np.errstate(divide="ignore"):
        return float(2.0 * t / np.float64(-mu[1] / mu[2]) - 1.0)


def _load(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def alpha_observations(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    batch_start: Sequence[Tensor],
    batch_end: Sequence[Tensor],
    theta_start: Sequence[Tensor],
    theta_end: Sequence[Tensor],
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> dict[str, float | list[float]]:
    """Brute-force observations for Alpha along ``d = theta_end - theta_start``.

    ``batch_*`` are ``(inputs, targets, ...)``; ``theta_*`` hold one tensor per trainable
    parameter. The model's parameters are restored afterwards.

    Returns:
        ``t = ||d||`` and lists (start, end) ``fs`` (mean of ``l_i + R``), ``dfs`` (``g . d/||d||``),
        ``var_fs`` and ``var_dfs`` (unbiased variances of ``l_i + R`` and ``g_i . d/||d||``).
    """
    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    direction = _cat(theta_end).detach() - _cat(theta_start).detach()
    t = direction.norm().item()
    unit = direction / t if t > 0 else direction
    obs: dict[str, list[float]] = {"fs": [], "dfs": [], "var_fs": [], "var_dfs": []}
    try:
        for theta, (inputs, targets, *_) in ((theta_start, batch_start), (theta_end, batch_end)):
            _load(params, theta)
            losses = individual_losses(model, per_sample_loss_fn, inputs, targets, regularized, weight_decay)
            grads = per_sample_gradients(model, per_sample_loss_fn, inputs, targets, regularized, weight_decay)
            slopes = flatten(grads) @ unit
            obs["fs"].append(losses.mean().item())
            obs["var_fs"].append(losses.var(unbiased=True).item())
            obs["dfs"].append(slopes.mean().item())
            obs["var_dfs"].append(slopes.var(unbiased=True).item())
    finally:
        _load(params, saved)
    return {"t": t, **obs}


def reference_alpha(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    batch_start: Sequence[Tensor],
    batch_end: Sequence[Tensor],
    theta_start: Sequence[Tensor],
    theta_end: Sequence[Tensor],
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> float:
    """Alpha of the step ``theta_start -> theta_end`` (see ``alpha_observations``)."""
    obs = alpha_observations(
        model, per_sample_loss_fn, batch_start, batch_end, theta_start, theta_end, regularized, weight_decay
    )
    return alpha_from_observations(obs["t"], obs["fs"], obs["dfs"], obs["var_fs"], obs["var_dfs"])
