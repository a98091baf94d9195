"""DeepOBS's synthetic data: Gaussian noise for the quadratic and two-dimensional problems.

Every draw comes from its own ``numpy.random.RandomState`` with a fixed seed, so the data (and the
quadratic's Hessian) are the same on every build, in every process, whatever the run's seed.
DeepOBS draws train, valid and test from the seeds 42, 44 and 43; ``train_eval`` is the whole
training set (its size equals the validation set's).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from problems.base import DataSplits

SPLIT_SEEDS = {"train": 42, "valid": 44, "test": 43}
"""DeepOBS's seed for each split of the synthetic data sets."""

SPECTRUM_SEED = 42
"""Seeds the Hessian's eigenvalues and rotation of ``quadratic_deep``."""


def quadratic_noise(seed: int, num_examples: int = 1000, dim: int = 100, std: float = 0.6) -> Tensor:
    """Draw the data points of the noisy quadratic, ``x ~ N(0, std^2 I)``.

    Args:
        seed: Seed of the ``RandomState`` that draws the points.
        num_examples: Number of points ``N``.
        dim: Dimension ``D`` of each point.
        std: Standard deviation of each coordinate.

    Returns:
        ``[N, D]`` float32 tensor.
    """
    rng = np.random.RandomState(seed)
    return torch.from_numpy(np.float32(rng.normal(0.0, std, (num_examples, dim))))


def two_d_noise(seed: int, num_examples: int = 10_000, std: float = 1.0) -> Tensor:
    """Draw the noise ``(x, y)`` of the two-dimensional problems.

    As in DeepOBS, all ``N`` values of ``x`` are drawn first, then all ``N`` values of ``y``.

    Args:
        seed: Seed of the ``RandomState`` that draws the noise.
        num_examples: Number of samples ``N``.
        std: Standard deviation of ``x`` and ``y``.

    Returns:
        ``[N, 2]`` float32 tensor whose columns are ``x`` and ``y``.
    """
    rng = np.random.RandomState(seed)
    x = rng.normal(0.0, std, num_examples)
    y = rng.normal(0.0, std, num_examples)
    return torch.from_numpy(np.float32(np.stack([x, y], axis=1)))


def haar_rotation(dim: int, rng: np.random.RandomState) -> np.ndarray:
    """Draw a rotation uniformly from the Haar measure on ``SO(dim)``.

    Uses the subgroup algorithm of Diaconis & Shahshahani (1987), drawing from ``rng`` in the
    same order as DeepOBS: one uniform angle for ``SO(2)``, then for each ``d = 2 .. dim - 1`` a
    Gaussian vector of length ``d + 1`` that fixes a Householder reflection lifting the rotation
    from ``d`` to ``d + 1`` dimensions.

    Args:
        dim: Dimension of the rotation, at least 2.
        rng: Generator the draws come from (advanced in place).

    Returns:
        ``[dim, dim]`` float64 orthogonal matrix.
    """
    if dim < 2:
        raise ValueError(f"a Haar rotation needs dim >= 2, got {dim}")
    angle = 2 * np.pi * rng.uniform()
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    for d in range(2, dim):
        direction = rng.normal(size=(d + 1, 1))
        direction /= np.sqrt(direction.T @ direction)
        first_axis = np.zeros((d + 1, 1))
        first_axis[0, 0] = 1.0
        mirror = (first_axis - direction) / np.sqrt((first_axis - direction).T @ (first_axis - direction))
        lifted = np.eye(d + 1)
        lifted[1:, 1:] = rotation
        rotation = lifted - 2 * np.outer(mirror, mirror.T @ lifted)
    return -rotation


def deep_learning_spectrum(dim: int = 100, seed: int = SPECTRUM_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Draw the eigenvalues and eigenbasis of ``quadratic_deep``'s Hessian.

    90% of the eigenvalues come from ``U(0, 1)`` and 10% from ``U(30, 60)`` (the spectrum reported
    for deep networks); the eigenbasis is a Haar-random rotation ``R`` drawn afterwards from the
    same generator, so ``Q = R^T diag(eigenvalues) R`` equals the Hessian DeepOBS builds on its
    first set-up in a fresh process.

    Args:
        dim: Dimension ``D`` (a multiple of 10).
        seed: Seed of the one ``RandomState`` used for all draws.

    Returns:
        ``(eigenvalues [D], rotation [D, D])``, both float64.
    """
    rng = np.random.RandomState(seed)
    small = rng.uniform(0.0, 1.0, dim * 9 // 10)
    large = rng.uniform(30.0, 60.0, dim - dim * 9 // 10)
    eigenvalues = np.concatenate([small, large])
    return eigenvalues, haar_rotation(dim, rng)


def synthetic_splits(train: Tensor, valid: Tensor, test: Tensor, target_shape: tuple[int, ...] = ()) -> DataSplits:
    """Wrap the three noise tensors as data sets whose targets are zeros.

    Args:
        train: ``[N_train, *S]`` inputs.
        valid: ``[N_valid, *S]`` inputs.
        test: ``[N_test, *S]`` inputs.
        target_shape: Shape of each (all-zero) target, e.g. ``()`` or ``(100,)``.

    Returns:
        The four splits; ``train_eval`` is the training set itself, as in DeepOBS.
    """

    def with_zero_targets(inputs: Tensor) -> TensorDataset:
        return TensorDataset(inputs, torch.zeros((len(inputs), *target_shape), dtype=inputs.dtype))

    train_set = with_zero_targets(train)
    return DataSplits(train=train_set, train_eval=train_set, valid=with_zero_targets(valid), test=with_zero_targets(test))
