"""DeepOBS's split rule: valid held out of train, train_eval a same-size subset of train."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from cockpit_cli.errors import CockpitError
from problems.base import DataSplits

DEEPOBS_VALID_SIZE = 10_000


def default_valid_size(train_size: int) -> int:
    """Return DeepOBS's 10,000, or a fifth of the training set where that is smaller."""
    return min(DEEPOBS_VALID_SIZE, train_size // 5)


def split_train_set(
    train_augmented: Dataset,
    train_plain: Dataset,
    test: Dataset,
    seed: int,
    valid_size: int | None = None,
    train_subset: int | None = None,
) -> DataSplits:
    """Hold ``valid_size`` random examples out of the official training set.

    Args:
        train_augmented: The official training set with training-time augmentation (may be the
            same object as ``train_plain`` when there is none).
        train_plain: The same examples without augmentation (used for valid and train_eval).
        test: The official test set.
        seed: Seeds the random permutation, so the split depends on the seed only.
        valid_size: Examples held out; ``None`` means :func:`default_valid_size`.
        train_subset: Keep only this many training examples (to provoke overfitting); ``None``
            keeps all. train_eval is then drawn from that subset.

    Returns:
        The four splits. ``train_eval`` has ``min(valid_size, len(train))`` examples.
    """
    total = len(train_plain)
    if len(train_augmented) != total:
        raise ValueError("augmented and plain training sets differ in length")
    valid_size = default_valid_size(total) if valid_size is None else valid_size
    if not 0 < valid_size < total:
        raise CockpitError(
            f"valid_size {valid_size} does not fit a training set of {total} examples",
            f"choose a valid_size between 1 and {total - 1}",
        )
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    valid_indices = permutation[:valid_size]
    train_indices = permutation[valid_size:]
    if train_subset is not None:
        if not 0 < train_subset <= len(train_indices):
            raise CockpitError(
                f"train_subset {train_subset} does not fit the {len(train_indices)} training examples",
                f"choose a train_subset between 1 and {len(train_indices)}",
            )
        train_indices = train_indices[:train_subset]
    eval_generator = torch.Generator().manual_seed(seed + 1)
    eval_size = min(valid_size, len(train_indices))
    eval_positions = torch.randperm(len(train_indices), generator=eval_generator)[:eval_size].tolist()
    train_eval_indices = [train_indices[i] for i in eval_positions]
    return DataSplits(
        train=Subset(train_augmented, train_indices),
        train_eval=Subset(train_plain, train_eval_indices),
        valid=Subset(train_plain, valid_indices),
        test=test,
    )
