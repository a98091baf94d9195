"""What a benchmark problem is: a model, its losses, its data splits and its metadata.

A problem factory returns a :class:`Problem`; it builds data and a freshly initialised model
and touches no global state except the torch random generator, which the caller seeds first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

SPLITS = ("train", "train_eval", "valid", "test")


@dataclass(frozen=True)
class ProblemInfo:
    """Static facts about a problem, shown by ``cockpit problems``.

    Attributes:
        name: Registry name, e.g. ``"mnist_mlp"``.
        dataset: Human name of the data set, e.g. ``"MNIST"``.
        model: Short description of the network, e.g. ``"MLP 784-1000-500-100-10, ReLU"``.
        batch_size: Default batch size (DeepOBS's where it has one), or ``None``.
        epochs: Default number of epochs (DeepOBS's where it has one), or ``None``.
        weight_decay: L2 factor lambda of the term ``0.5 * lambda * ||w||^2`` in the loss.
        has_accuracy: Whether accuracy is defined (classification).
        has_batchnorm: Whether the network has BatchNorm layers (no exact per-sample gradients).
        downloads: Whether the data set is read from ``data_dir`` (torchvision) rather than
            generated locally.
        notes: One short line of extra facts for the problem table.
        parameters: Trainable parameters with the default options (checked by the tests
            against a built model), so the problem table needs no data.
    """

    name: str
    dataset: str
    model: str
    batch_size: int | None
    epochs: int | None
    weight_decay: float = 0.0
    has_accuracy: bool = True
    has_batchnorm: bool = False
    downloads: bool = False
    notes: str = ""
    parameters: int | None = None


@dataclass
class DataSplits:
    """The four DeepOBS splits; each item of a split is ``(input, target)``.

    ``valid`` is held out of the official training set, ``train_eval`` is a random subset of
    the (remaining) training set of the same size as ``valid``, ``test`` is the official test set.
    ``train`` may apply data augmentation; the other three never do.
    """

    train: Dataset
    train_eval: Dataset
    valid: Dataset
    test: Dataset

    def get(self, split: str) -> Dataset:
        """Return the split called ``split`` (one of :data:`SPLITS`)."""
        if split not in SPLITS:
            raise KeyError(split)
        return getattr(self, split)


LossFunction = Callable[[object, Tensor], Tensor]


@dataclass
class Problem:
    """A model with its losses and data, ready to train.

    Attributes:
        info: Static facts about the problem.
        model: The network, freshly initialised. Its output for a batch of ``N`` inputs is a
            tensor whose first dimension is ``N`` (or, for the VAE, a tuple of such tensors).
        loss_function: ``(outputs, targets) -> scalar``, the mean over the batch of the
            per-sample data loss, without the weight-decay term. Where possible this is a
            ``torch.nn`` loss module (``CrossEntropyLoss`` or ``MSELoss`` with ``reduction="mean"``)
            so that BackPACK can extend it.
        per_sample_loss_function: ``(outputs, targets) -> [N]``, the per-sample data losses;
            their mean equals ``loss_function``.
        splits: The data.
        weight_decay: The L2 factor lambda (see :meth:`regularization_loss`).
        decayed_parameters: The parameters the L2 term applies to (e.g. weights, not biases).
    """

    info: ProblemInfo
    model: nn.Module
    loss_function: LossFunction
    per_sample_loss_function: LossFunction
    splits: DataSplits
    weight_decay: float = 0.0
    decayed_parameters: list[nn.Parameter] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name

    def regularization_loss(self) -> Tensor:
        """Return ``0.5 * weight_decay * sum ||w||^2`` over the decayed parameters (a scalar)."""
        if self.weight_decay == 0.0 or not self.decayed_parameters:
            device = next(self.model.parameters()).device
            return torch.zeros((), device=device)
        return 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in self.decayed_parameters)

    def correct_mask(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """Return which samples are classified correctly (``[N]`` bool), or ``None`` without accuracy.

        Args:
            outputs: Logits ``[N, C]``.
            targets: Class indices ``[N]``.
        """
        if not self.info.has_accuracy:
            return None
        return outputs.argmax(dim=1) == targets

    def correct(self, outputs: Tensor, targets: Tensor) -> int | None:
        """Return the number of correctly classified samples, or ``None`` without accuracy."""
        mask = self.correct_mask(outputs, targets)
        return None if mask is None else int(mask.sum().item())

    def num_parameters(self) -> int:
        """Return the number of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
