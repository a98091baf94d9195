"""quadratic_deep: DeepOBS's 100-dimensional noisy quadratic with a deep-learning spectrum.

The per-example loss is ``0.5 (theta - x)^T Q (theta - x)`` with ``x ~ N(0, 0.6^2 I)`` and a fixed
Hessian ``Q = R^T diag(lambda) R`` (90 eigenvalues in ``(0, 1)``, 10 in ``(30, 60)``). To let
BackPACK extend it, the model is written as two linear layers and an MSE loss:

* ``shift``: ``Linear(100, 100)`` with frozen weight ``-I`` and trainable bias ``theta``, so its
  output is ``theta - x``;
* ``scale``: frozen ``Linear(100, 100, bias=False)`` with weight ``sqrt(D / 2) Q^{1/2}``;
* ``MSELoss()`` against zero targets, whose mean over ``N * D`` entries is
  ``(1 / N) sum_i 0.5 (theta - x_i)^T Q (theta - x_i)``, the mean per-example loss exactly.

Only ``theta`` (100 numbers) is trainable. ``model.hessian`` (or :func:`quadratic_hessian`) gives
``Q``, the exact Hessian of the loss with respect to ``theta``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from problems.base import Problem, ProblemInfo
from problems.datasets.synthetic import SPLIT_SEEDS, deep_learning_spectrum, quadratic_noise, synthetic_splits
from problems.registry import register

DIM = 100
NUM_EXAMPLES = 1000
NOISE_STD = 0.6

INFO = ProblemInfo(
    name="quadratic_deep",
    dataset="quadratic noise",
    model="noisy quadratic, theta in R^100, Hessian spectrum 90 x U(0,1) + 10 x U(30,60)",
    batch_size=128,
    epochs=100,
    has_accuracy=False,
    parameters=100,
    notes="1000 points per split; fixed Hessian (model.hessian); theta starts at ones",
)


@lru_cache(maxsize=1)
def _spectrum() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(eigenvalues [D], rotation [D, D])`` of the fixed Hessian (drawn once)."""
    return deep_learning_spectrum(DIM)


def quadratic_hessian() -> Tensor:
    """Return the Hessian ``Q = R^T diag(lambda) R`` of quadratic_deep, ``[100, 100]`` float64.

    It depends on fixed seeds only: every build, in every process, gets the same matrix.
    """
    eigenvalues, rotation = _spectrum()
    return torch.from_numpy(rotation.T @ np.diag(eigenvalues) @ rotation)


def _scaled_root() -> Tensor:
    """Return ``sqrt(D / 2) Q^{1/2}`` as a ``[D, D]`` float32 tensor (symmetric)."""
    eigenvalues, rotation = _spectrum()
    root = rotation.T @ np.diag(np.sqrt(eigenvalues)) @ rotation
    return torch.from_numpy(np.float32(math.sqrt(DIM / 2) * root))


class QuadraticDeepNet(nn.Sequential):
    """Maps points ``x [N, D]`` to ``sqrt(D / 2) Q^{1/2} (theta - x)``, shape ``[N, D]``.

    Attributes:
        hessian: Buffer ``[D, D]`` (float32) holding ``Q``, the loss's Hessian in ``theta``.
    """

    def __init__(self) -> None:
        shift = nn.Linear(DIM, DIM)
        shift.weight.data = -torch.eye(DIM)
        shift.weight.requires_grad_(False)
        shift.bias.data = torch.ones(DIM)
        scale = nn.Linear(DIM, DIM, bias=False)
        scale.weight.data = _scaled_root()
        scale.weight.requires_grad_(False)
        super().__init__(shift, scale)
        self.register_buffer("hessian", quadratic_hessian().float())

    @property
    def theta(self) -> nn.Parameter:
        """The trainable point ``theta [D]`` (the bias of the first layer)."""
        return self[0].bias


class PerSampleMSE(nn.Module):
    """Per-sample mean squared error: ``[N, D], [N, D] -> [N]`` (mean over the last dimension)."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs, targets, reduction="none").mean(dim=1)


@register(INFO)
def quadratic_deep(*, data_dir: Path, download: bool, seed: int) -> Problem:
    """Build quadratic_deep.

    The data and the Hessian are the same for every seed (DeepOBS's fixed seeds); ``data_dir``,
    ``download`` and ``seed`` are unused. Items are ``(x [100], zeros [100])``.
    """
    splits = synthetic_splits(
        *(quadratic_noise(SPLIT_SEEDS[split], NUM_EXAMPLES, DIM, NOISE_STD) for split in ("train", "valid", "test")),
        target_shape=(DIM,),
    )
    return Problem(
        info=INFO,
        model=QuadraticDeepNet(),
        loss_function=nn.MSELoss(),
        per_sample_loss_function=PerSampleMSE(),
        splits=splits,
    )
