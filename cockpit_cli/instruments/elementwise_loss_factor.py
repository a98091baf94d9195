"""Symmetric factors of the Hessians of losses of each output on its own: ``BCEWithLogitsLoss``,
``MSELoss`` and the robust regression losses ``HuberLoss``, ``SmoothL1Loss`` and ``L1Loss``, for
outputs of any shape and every option.

Such a loss treats each output ``z`` of each sample on its own, so its Hessian with respect to a
sample's outputs is diagonal, whatever the targets: ``a sigma(z) (1 - sigma(z))`` for binary
cross-entropy with logits (targets 0, 1 or a probability), ``2 a`` for the squared error, ``a``
for Huber's loss where the residual ``|z - y|`` is at most ``delta`` (0 beyond, where the loss
is linear), ``a / beta`` for the smooth L1 loss where it is at most ``beta``, and 0 for the L1
loss. ``a``
is the output's weight in the loss: ``1 / (N K)`` for the mean over ``N`` samples of ``K``
outputs, ``1`` for the sum, times binary cross-entropy's ``weight``, and times
``pos_weight t + 1 - t`` for a target ``t`` where positives are weighted. Binary cross-entropy's
is read off the loss itself (:func:`~cross_entropy_factor.curvature_at_zero`, where
``sigma (1 - sigma) = 1 / 4``), so every option counts as torch computes it; the squared error's
one option is its reduction.

The factor has one column per output (``[K, N, ...]``), and ``M`` drawn columns for the
Monte-Carlo GGN: the gradients of targets drawn from the model's own predictive distribution
(Bernoulli, or Gaussian of variance 1/2 for the squared error), whose mean square is the Hessian;
the robust losses, which are no likelihoods of a distribution one could draw from, take signs
drawn at random times the square root of their Hessian's diagonal (every square is the Hessian).
BackPACK's own rules take two-dimensional outputs only (a regression's ``[N]`` outputs stop
them) and, for binary cross-entropy, one output, targets of exactly 0 or 1 and no weights, with
no rule for the Hessian diagonal.
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.basederivatives import BaseLossDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from torch.nn import functional

from cockpit_cli.instruments.cross_entropy_factor import curvature_at_zero
from cockpit_cli.instruments.loss_output_weight import OutputWeighted


class ElementwiseLossDerivatives(OutputWeighted, BaseLossDerivatives):
    """The Hessian factors of a loss of each output on its own, that BackPACK's curvature rules
    backpropagate; subclasses give the loss, its Hessian and its predictive draws."""

    def _sqrt_hessian(self, module: nn.Module, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        """Return ``S`` (``[K, N, ...]``, ``K`` outputs per sample; ``[1, N]`` for one output per
        sample as ``[N]``) with ``S[:, n]^T S[:, n]`` the Hessian of the loss with respect to
        sample ``n``'s outputs."""
        outputs = subsample(module.input0, subsampling=subsampling)
        diagonal = self.hessian_diagonal(module, outputs, subsampling).clamp(min=0.0).sqrt().reshape(len(outputs), -1)  # [N, K]
        factor = torch.diag_embed(diagonal).permute(2, 0, 1)  # S[v, n, k] = delta_vk diagonal[n, k]
        return factor.reshape(-1, *outputs.shape)

    def _sqrt_hessian_sampled(self, module: nn.Module, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        """Return ``M`` drawn columns ``[M, N, ...]`` whose mean square is the Hessian's diagonal."""
        outputs = subsample(module.input0, subsampling=subsampling)
        weights = self.output_weights(module)
        weights = (weights if subsampling is None else weights[subsampling]).clamp(min=0.0)
        return self.draws(outputs, mc_samples) * weights.sqrt() / math.sqrt(mc_samples)

    def hessian_is_psd(self) -> bool:
        return True

    def hessian_diagonal(self, module: nn.Module, outputs: Tensor, subsampling: list[int] | None) -> Tensor:
        """The loss's second derivative at each output (shaped like ``outputs``)."""
        weights = self.output_weights(module)
        return (weights if subsampling is None else weights[subsampling]) * self.unit_curvature(outputs)

    def output_weights(self, module: nn.Module) -> Tensor:
        """Return ``a`` (shaped like the outputs): each output's weight in the loss ``module`` as
        computed at its last forward pass (its inputs as BackPACK stores them)."""
        outputs, targets = module.input0, module.input1
        at_zero = curvature_at_zero(lambda z: self.loss_of(module, z, targets), outputs, torch.ones_like(outputs))  # the Hessian is diagonal
        return at_zero / self.unit_curvature(torch.zeros((), dtype=outputs.dtype, device=outputs.device))

    def loss_of(self, module: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss ``module`` computes of ``outputs`` (with all its options)."""
        raise NotImplementedError

    def unit_curvature(self, outputs: Tensor) -> Tensor:
        """The second derivative of an output's term of weight 1."""
        raise NotImplementedError

    def draws(self, outputs: Tensor, count: int) -> Tensor:
        """``[count, *outputs.shape]`` gradients of an output's term of weight 1 at targets drawn
        from the model's predictive distribution: their mean square is :meth:`unit_curvature`."""
        raise NotImplementedError


class BinaryCrossEntropyDerivatives(ElementwiseLossDerivatives):
    """``BCEWithLogitsLoss``: ``sigma (1 - sigma)`` per unit weight; draws ``sigma - y``, ``y ~ Bernoulli(sigma)``."""

    def loss_of(self, module: nn.BCEWithLogitsLoss, outputs: Tensor, targets: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(outputs, targets, weight=module.weight, pos_weight=module.pos_weight, reduction=module.reduction)

    def unit_curvature(self, outputs: Tensor) -> Tensor:
        probs = torch.sigmoid(outputs)
        return probs * (1.0 - probs)

    def draws(self, outputs: Tensor, count: int) -> Tensor:
        probs = torch.sigmoid(outputs)
        return probs - torch.bernoulli(probs.unsqueeze(0).expand(count, *probs.shape))


class SquaredErrorDerivatives(ElementwiseLossDerivatives):
    """``MSELoss``: 2 per unit weight; draws ``2 (f - y)``, ``y ~ N(f, 1/2)``, that is ``sqrt(2) z``.

    Every output has the same weight (``1 / (N K)`` averaged, 1 summed), so the factor is one
    diagonal shared by the samples: a view, not ``N K^2`` numbers."""

    def _sqrt_hessian(self, module: nn.MSELoss, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        outputs = subsample(module.input0, subsampling=subsampling)
        width = outputs[0].numel()
        diagonal = torch.eye(width, dtype=outputs.dtype, device=outputs.device).mul_(math.sqrt(2.0 * self._weight(module)))  # [K, K]
        return diagonal.unsqueeze(1).expand(width, len(outputs), width).reshape(width, *outputs.shape)

    def output_weights(self, module: nn.MSELoss) -> Tensor:
        return torch.full_like(module.input0, self._weight(module))

    @staticmethod
    def _weight(module: nn.MSELoss) -> float:
        """Every output's weight in the loss: ``1 / (N K)`` averaged, 1 summed."""
        return 1.0 / module.input0.numel() if module.reduction == "mean" else 1.0

    def unit_curvature(self, outputs: Tensor) -> Tensor:
        return torch.full_like(outputs, 2.0)

    def draws(self, outputs: Tensor, count: int) -> Tensor:
        return math.sqrt(2.0) * torch.randn(count, *outputs.shape, dtype=outputs.dtype, device=outputs.device)


class RobustRegressionDerivatives(ElementwiseLossDerivatives):
    """``HuberLoss``, ``SmoothL1Loss`` and ``L1Loss``: quadratic in the residual ``r = z - y`` up to
    a width, linear beyond; the second derivative per unit weight is ``1`` (Huber, width
    ``delta``), ``1 / beta`` (smooth L1, width ``beta``) inside, 0 outside and for the L1 loss.
    Inside includes the width itself, as torch's gradient takes the quadratic branch there."""

    def output_weights(self, module: nn.Module) -> Tensor:
        outputs = module.input0
        return torch.full_like(outputs, 1.0 / outputs.numel() if module.reduction == "mean" else 1.0)

    def hessian_diagonal(self, module: nn.Module, outputs: Tensor, subsampling: list[int] | None) -> Tensor:
        targets = subsample(module.input1, subsampling=subsampling)
        width, height = _quadratic_part(module)
        inside = ((outputs - targets).abs() <= width).to(outputs.dtype)
        weights = self.output_weights(module)
        return (weights if subsampling is None else weights[subsampling]) * inside * height

    def _sqrt_hessian_sampled(self, module: nn.Module, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        outputs = subsample(module.input0, subsampling=subsampling)
        roots = self.hessian_diagonal(module, outputs, subsampling).sqrt()
        signs = torch.randint(0, 2, (mc_samples, *outputs.shape), device=outputs.device).to(outputs.dtype).mul_(2).sub_(1)
        return signs * roots / math.sqrt(mc_samples)


def _quadratic_part(module: nn.Module) -> tuple[float, float]:
    """The width of the loss's quadratic part around a zero residual and its second derivative
    there (per unit weight); ``(-1, 0)``: none (the L1 loss)."""
    if isinstance(module, nn.HuberLoss):
        return module.delta, 1.0
    if isinstance(module, nn.SmoothL1Loss) and module.beta > 0:
        return module.beta, 1.0 / module.beta
    return -1.0, 0.0
