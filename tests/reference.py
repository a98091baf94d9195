"""Slow, brute-force references for the instruments, computed with plain autograd.

Notation: ``N`` samples, ``D`` trainable parameters in total, ``g_i`` the gradient of sample
``i``'s total loss ``l_i + R`` with the regularizer ``R = 0.5 * lam * sum ||w||^2`` over the
``regularized`` parameters, and ``g = mean_i g_i``, the gradient of the mini-batch loss
``L = mean_i l_i + R``. Per-sample gradients come from a Python loop of
``torch.autograd.grad`` over samples. The curvature references (Hessian, GGN, TIC, max
eigenvalue) and Alpha live in ``reference_curvature``.

With ``R = 0`` these agree with Cockpit 1.0.2 to float64 round-off. With ``R != 0`` Cockpit
differs by construction: its per-sample gradients come from BackPACK, which does not see a
regularizer added to the loss, and its curvature diagonals omit ``lam``, while its mean
gradient is ``p.grad``, which includes ``grad R``. Here ``g_i`` includes ``grad R``
throughout, so ``g`` is exactly their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]  # (outputs [N, C], targets) -> [N]


# --- tiny models and batches --------------------------------------------------------------


def mlp(seed: int) -> nn.Sequential:
    """Linear(6, 5)-ReLU-Linear(5, 4)-Sigmoid-Linear(4, 3) in float64: [N, 6] -> [N, 3]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
    ).double()


def cnn(seed: int) -> nn.Sequential:
    """Conv2d(2, 3, 3)-ReLU-MaxPool2d(2)-Flatten-Linear(12, 3) in float64: [N, 2, 6, 6] -> [N, 3]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    ).double()


INPUT_SHAPES = {"mlp": (6,), "cnn": (2, 6, 6)}
NUM_OUTPUTS = 3


class Batch(NamedTuple):
    """A mini-batch with its mean-reduced loss module and per-sample loss function."""

    inputs: Tensor  # [N, *input_shape], float64
    targets: Tensor  # [N] int64 (cross-entropy) or [N, 3] float64 (MSE)
    loss_fn: nn.Module  # mean-reduced: loss_fn(outputs, targets) == per_sample_loss_fn(...).mean()
    per_sample_loss_fn: PerSampleLoss


def mse_per_sample(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample MSE, averaged over output dims so its mean over samples equals ``nn.MSELoss()``."""
    return ((outputs - targets) ** 2).flatten(start_dim=1).mean(dim=1)


def cross_entropy_per_sample(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy ``[N]`` of logits ``[N, C]`` and classes ``[N]``."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def loss_functions(loss: str) -> tuple[nn.Module, PerSampleLoss]:
    """Return ``(mean-reduced loss module, per-sample loss function)`` for ``"ce"`` or ``"mse"``."""
    if loss == "ce":
        return nn.CrossEntropyLoss(), cross_entropy_per_sample
    if loss == "mse":
        return nn.MSELoss(), mse_per_sample
    raise ValueError(f"unknown loss {loss!r}; use 'ce' or 'mse'")


def batch(kind: str, loss: str, n: int, seed: int) -> Batch:
    """Random float64 inputs for model ``kind`` ("mlp" or "cnn") and targets for ``loss``."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, *INPUT_SHAPES[kind], generator=gen, dtype=torch.float64)
    if loss == "ce":
        targets = torch.randint(0, NUM_OUTPUTS, (n,), generator=gen)
    else:
        targets = torch.randn(n, NUM_OUTPUTS, generator=gen, dtype=torch.float64)
    return Batch(inputs, targets, *loss_functions(loss))


# --- gradients -------------------------------------------------------------------------------


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def weights(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters whose name ends in ``weight`` (the usual weight-decay set)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and name.endswith("weight")]


def regularizer(regularized: Sequence[Tensor] | None, weight_decay: float) -> Tensor | float:
    """``R = 0.5 * weight_decay * sum_p ||p||^2`` over ``regularized`` (0.0 when there are none)."""
    if not regularized or weight_decay == 0.0:
        return 0.0
    return 0.5 * weight_decay * sum((p**2).sum() for p in regularized)


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def per_sample_gradients(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> list[Tensor]:
    """Gradients ``g_i`` of ``l_i + R``, one backward per sample (model in its current mode).

    Returns:
        One tensor ``[N, *p.shape]`` per trainable parameter ``p``.
    """
    params = trainable(model)
    rows = []
    for i in range(inputs.shape[0]):
        loss_i = per_sample_loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).sum()
        rows.append(_grads(loss_i + regularizer(regularized, weight_decay), params))
    return [torch.stack(per_param) for per_param in zip(*rows)]


def individual_losses(
    model: nn.Module,
    per_sample_loss_fn: PerSampleLoss,
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> Tensor:
    """Individual total losses ``l_i + R``, shape ``[N]``, one forward pass per sample."""
    with torch.no_grad():
        reg = float(regularizer(regularized, weight_decay))
        return torch.cat(
            [per_sample_loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]) for i in range(len(inputs))]
        ) + reg


def batch_gradient(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    regularized: Sequence[Tensor] | None = None,
    weight_decay: float = 0.0,
) -> list[Tensor]:
    """Gradient of ``L = loss_fn(model(inputs), targets) + R`` from one batched backward pass."""
    loss = loss_fn(model(inputs), targets) + regularizer(regularized, weight_decay)
    return _grads(loss, trainable(model))


def flatten(grads: Sequence[Tensor] | Tensor) -> Tensor:
    """Per-parameter per-sample tensors ``[N, *p.shape]`` -> one matrix ``[N, D]``."""
    if isinstance(grads, Tensor):
        return grads
    return torch.cat([g.flatten(start_dim=1) for g in grads], dim=1)


# --- gradient-statistic quantities (inputs: per-sample gradients, list or [N, D]) ------------


def grad_norm(grads: Sequence[Tensor]) -> list[float]:
    """GradNorm: ``||g^p||`` of the mean gradient, per parameter."""
    return [g.mean(0).norm().item() for g in grads]


def norm_test(grads: Sequence[Tensor] | Tensor) -> float:
    """NormTest: ``sqrt(sum_i ||g_i - g||^2 / (N (N-1) ||g||^2))``."""
    G = flatten(grads)
    n, g = G.shape[0], G.mean(0)
    return ((G - g).pow(2).sum() / (n * (n - 1) * g.dot(g))).sqrt().item()


def inner_test(grads: Sequence[Tensor] | Tensor) -> float:
    """InnerTest: ``sqrt(sum_i (g_i.g - ||g||^2)^2 / (N (N-1) ||g||^4))``."""
    G = flatten(grads)
    n, g = G.shape[0], G.mean(0)
    sq = g.dot(g)
    return ((G @ g - sq).pow(2).sum() / (n * (n - 1) * sq**2)).sqrt().item()


def ortho_test(grads: Sequence[Tensor] | Tensor) -> float:
    """OrthoTest: ``sqrt(sum_i ||g_i - (g_i.g / ||g||^2) g||^2 / (N (N-1) ||g||^2))``."""
    G = flatten(grads)
    n, g = G.shape[0], G.mean(0)
    sq = g.dot(g)
    orthogonal = G - (G @ g / sq)[:, None] * g[None, :]
    return (orthogonal.pow(2).sum() / (n * (n - 1) * sq)).sqrt().item()


def mean_gsnr(grads: Sequence[Tensor] | Tensor, epsilon: float = 1e-5) -> float:
    """MeanGSNR: ``mean_d g_d^2 / ((1/N) sum_i g_{i,d}^2 - g_d^2 + epsilon)``."""
    G = flatten(grads)
    g2 = G.mean(0) ** 2
    return (g2 / (G.pow(2).mean(0) - g2 + epsilon)).mean().item()


def cabs(grads: Sequence[Tensor] | Tensor, loss: float, lr: float) -> float:
    """CABS: ``lr * sum_d sum_i (g_{i,d} - g_d)^2 / (N * loss)`` with ``loss`` the mini-batch loss."""
    G = flatten(grads)
    return (lr * (G - G.mean(0)).pow(2).sum() / (G.shape[0] * loss)).item()


def early_stopping(grads: Sequence[Tensor] | Tensor, epsilon: float = 1e-5) -> float:
    """EB criterion: ``1 - N * mean_d g_d^2 / (var_d + epsilon)``, ``var_d`` the unbiased variance.

    Cockpit writes the same quantity as ``1 - B/D * sum_d ...``.
    """
    G = flatten(grads)
    variance = G.var(dim=0, unbiased=True)
    return (1 - G.shape[0] * (G.mean(0) ** 2 / (variance + epsilon)).mean()).item()


# --- parameter-space distances and per-layer extras ------------------------------------------


def _norms_of_differences(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[float]:
    return [(x.detach() - y.detach()).norm().item() for x, y in zip(a, b)]


def distance(theta_t: Sequence[Tensor], theta_0: Sequence[Tensor]) -> list[float]:
    """Distance: ``||theta_t^p - theta_0^p||`` per parameter."""
    return _norms_of_differences(theta_t, theta_0)


def update_size(theta_next: Sequence[Tensor], theta_t: Sequence[Tensor]) -> list[float]:
    """UpdateSize: ``||theta_{t+1}^p - theta_t^p||`` per parameter."""
    return _norms_of_differences(theta_next, theta_t)


def param_norms(theta: Sequence[Tensor]) -> list[float]:
    """Weight norm ``||theta^p||`` per parameter."""
    return [p.detach().norm().item() for p in theta]


def update_ratio(theta_next: Sequence[Tensor], theta_t: Sequence[Tensor]) -> list[float]:
    """``||theta_{t+1}^p - theta_t^p|| / ||theta_t^p||`` per parameter (pre-update weights)."""
    return [u / w for u, w in zip(update_size(theta_next, theta_t), param_norms(theta_t))]


def zero_grad_fraction(grads: Sequence[Tensor]) -> list[float]:
    """Fraction of exactly-zero entries of the mean gradient ``g^p``, per parameter."""
    return [(g.mean(0) == 0).double().mean().item() for g in grads]


def _stats(x: Tensor) -> dict[str, float]:
    x = x.detach().double()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item()}


def activation_stats(model: nn.Module, module: nn.Module, inputs: Tensor) -> dict[str, float] | None:
    """Mean, population std (``unbiased=False``) and fraction of exact zeros of ``module``'s
    outputs (all of them, where it runs more than once in a forward pass; ``None`` where it does not run)."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    if not seen:
        return None
    out = torch.cat([output.flatten() for output in seen])
    return {**_stats(out), "zero_fraction": (out == 0).double().mean().item()}


def input_stats(inputs: Tensor) -> dict[str, float]:
    """Mean, population std (``unbiased=False``), min and max over all input entries."""
    return {**_stats(inputs), "min": inputs.min().item(), "max": inputs.max().item()}


# --- histograms ----------------------------------------------------------------------------


def grad_hist1d(
    grads: Sequence[Tensor] | Tensor, bins: int = 100, range: tuple[float, float] = (-2.0, 2.0)
) -> Tensor:
    """GradHist1d: counts ``[bins]`` (int64) of all ``N*D`` entries of the ``g_i``, clamped into range.

    Bin ``k`` covers ``[lo + k w, lo + (k+1) w)``; ``hi`` falls into the last bin (numpy rule).
    """
    values = np.clip(flatten(grads).detach().cpu().numpy().ravel(), *range)
    counts, _ = np.histogram(values, bins=bins, range=range)
    return torch.from_numpy(counts.astype(np.int64))


def grad_hist2d(
    grads: Sequence[Tensor],
    theta: Sequence[Tensor],
    bins: tuple[int, int] = (40, 50),
    range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
) -> Tensor:
    """GradHist2d: joint counts ``[bins[0], bins[1]]`` of ``(g_{i,d}, theta_d)`` over all i, d."""
    return sum(grad_hist2d_per_param(grads, theta, bins, range))


def grad_hist2d_per_param(
    grads: Sequence[Tensor],
    theta: Sequence[Tensor],
    bins: tuple[int, int] = (40, 50),
    range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
) -> list[Tensor]:
    """Per-parameter 2-D histograms (int64 ``[bins[0], bins[1]]``), both axes clamped into range."""
    hists = []
    for g, p in zip(grads, theta):
        x = np.clip(g.detach().cpu().numpy().reshape(g.shape[0], -1), *range[0])
        y = np.clip(p.detach().cpu().numpy().reshape(1, -1), *range[1])
        y = np.broadcast_to(y, x.shape)
        counts, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins, range=range)
        hists.append(torch.from_numpy(counts.astype(np.int64)))
    return hists
