"""A symmetric factor of the Hessian of ``BCEWithLogitsLoss``, for every output and option.

The loss treats each output ``z`` of each sample on its own (a logit of its own binary target),
so its Hessian with respect to a sample's outputs is diagonal: ``a sigma(z) (1 - sigma(z))`` at
each output, whatever the target (a probability as well as 0 or 1). ``a`` is the output's weight
in the loss: ``1 / (N K)`` for the plain mean over ``N`` samples of ``K`` outputs, times the
``weight`` given, times ``pos_weight t + 1 - t`` for a target ``t`` where the positives are
weighted. It is read off the loss itself (:func:`~cross_entropy_factor.curvature_at_zero`, where
``sigma (1 - sigma) = 1 / 4``), so every option counts as torch computes it.

BackPACK's own rule takes one output per sample, targets of exactly 0 or 1 and no weights, and
has no rule for the Hessian diagonal; this one has ``K`` columns per sample (like the squared
error's), and ``M`` sampled columns for the Monte-Carlo GGN.
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.basederivatives import BaseLossDerivatives
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from torch.nn import functional

from cockpit_cli.instruments.cross_entropy_factor import curvature_at_zero


def output_weights(module: nn.BCEWithLogitsLoss) -> Tensor:
    """Return ``a`` (shaped like the logits ``[N, ...]``): the weight of each output's Hessian
    ``sigma (1 - sigma)`` in the loss ``module`` as computed at its last forward pass (its
    inputs as BackPACK stores them)."""
    logits, targets = module.input0, module.input1

    def loss_of(z: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(z, targets, weight=module.weight, pos_weight=module.pos_weight, reduction=module.reduction)

    return 4.0 * curvature_at_zero(loss_of, logits, torch.ones_like(logits))  # the Hessian is diagonal


class BinaryCrossEntropyDerivatives(BaseLossDerivatives):
    """The Hessian factors of ``BCEWithLogitsLoss`` that BackPACK's curvature rules backpropagate."""

    def _sqrt_hessian(self, module: nn.BCEWithLogitsLoss, g_inp: tuple, g_out: tuple, subsampling: list[int] | None = None) -> Tensor:
        """Return ``S`` (``[K, N, ...]``, ``K`` outputs per sample) with ``S[:, n]^T S[:, n]`` the
        Hessian of the loss with respect to sample ``n``'s outputs."""
        logits = subsample(module.input0, subsampling=subsampling)
        probs = torch.sigmoid(logits)
        diagonal = (self._weights(module, subsampling) * probs * (1.0 - probs)).sqrt().flatten(1)  # [N, K]
        factor = torch.diag_embed(diagonal).permute(2, 0, 1)  # S[v, n, k] = delta_vk diagonal[n, k]
        return factor.reshape(-1, *logits.shape)

    def _sqrt_hessian_sampled(self, module: nn.BCEWithLogitsLoss, g_inp: tuple, g_out: tuple, mc_samples: int = 1, subsampling: list[int] | None = None) -> Tensor:
        """Return ``M`` sampled columns ``[M, N, ...]``: the gradients ``sigma - y`` of targets
        ``y`` drawn from the model's own probabilities, whose mean square is the Hessian."""
        logits = subsample(module.input0, subsampling=subsampling)
        probs = torch.sigmoid(logits)
        drawn = torch.bernoulli(probs.unsqueeze(0).expand(mc_samples, *probs.shape))
        return (probs - drawn) * self._weights(module, subsampling).sqrt() / math.sqrt(mc_samples)

    def hessian_is_psd(self) -> bool:
        return True

    @staticmethod
    def _weights(module: nn.BCEWithLogitsLoss, subsampling: list[int] | None) -> Tensor:
        weights = output_weights(module).clamp(min=0.0)
        return weights if subsampling is None else weights[subsampling]
