"""MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN, preprocessed as DeepOBS's PyTorch data sets.

DeepOBS (``deepobs/pytorch/datasets/``) applies ``ToTensor`` to MNIST and Fashion-MNIST, and
``ToTensor`` followed by a per-channel ``Normalize`` to CIFAR and SVHN. Here the whole data set
stays in memory as uint8 and is converted on access with the same float32 arithmetic
(``x / 255``, then ``(x - mean) / std``), which gives bit-identical inputs without a PIL image
per example. Training-time augmentation follows DeepOBS's parameters, applied with
``torchvision.transforms.v2`` to uint8 tensors before that conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cockpit_cli.errors import unknown_name_error
from problems.base import DataSplits
from problems.datasets.image_files import SOURCES, read_split
from problems.datasets.splits import split_train_set

IMAGE_DATASETS: tuple[str, ...] = ("mnist", "fmnist", "cifar10", "cifar100", "svhn")

# Per-channel (mean, std) of DeepOBS's Normalize; MNIST and Fashion-MNIST are not normalised.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    "svhn": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
}


def deepobs_augmentation(dataset: str) -> v2.Transform | None:
    """Return DeepOBS's training-time augmentation on uint8 ``[C, H, W]`` images, or ``None``.

    CIFAR-10/100: zero-pad 2 pixels, random 32 x 32 crop, horizontal flip with probability 0.5,
    colour jitter (brightness +-63/255, contrast in [0.2, 1.8], saturation in [0.5, 1.5]).
    SVHN: the same without the flip (digits are not mirror-symmetric). MNIST and Fashion-MNIST:
    none.
    """
    if dataset not in NORMALIZATION:
        return None
    jitter = v2.ColorJitter(brightness=63.0 / 255.0, contrast=(0.2, 1.8), saturation=(0.5, 1.5))
    flip = [v2.RandomHorizontalFlip(p=0.5)] if dataset.startswith("cifar") else []
    return v2.Compose([v2.Pad(padding=2), v2.RandomCrop(size=(32, 32)), *flip, jitter])


class ImageTensorDataset(Dataset):
    """Images kept as uint8 and converted to model inputs on access.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` int64.
        mean: Per-channel mean of the normalisation, or ``None`` for ``ToTensor`` only.
        std: Per-channel standard deviation, or ``None``.
        input_scale: Factor applied to the final inputs.
        augmentation: Transform of one uint8 ``[C, H, W]`` image, applied before conversion.

    Each item is ``(image [C, H, W] float32, label [] int64)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        input_scale: float = 1.0,
        augmentation: v2.Transform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("expected uint8 images [N, C, H, W] and as many labels")
        self.images = images
        self.labels = labels
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.input_scale = float(input_scale)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def convert(self, images: Tensor) -> Tensor:
        """Map uint8 ``[..., C, H, W]`` to float32 inputs: ``ToTensor``, ``Normalize``, scale."""
        x = images.to(torch.float32).div(255)
        if self.mean is not None:
            x = x.sub(self.mean).div(self.std)
        if self.input_scale != 1.0:
            x = x.mul(self.input_scale)
        return x

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augmentation is not None:
            image = self.augmentation(image)
        return self.convert(image), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Fetch a whole batch (used by ``DataLoader``), converting it in one operation."""
        if self.augmentation is not None:
            return [self[index] for index in indices]
        positions = torch.as_tensor(indices, dtype=torch.int64)
        images, labels = self.convert(self.images[positions]), self.labels[positions]
        return list(zip(images.unbind(0), labels.unbind(0)))


def load_image_splits(
    dataset: str,
    data_dir: Path,
    download: bool,
    seed: int,
    *,
    valid_size: int | None = None,
    train_subset: int | None = None,
    augment: bool = True,
    input_scale: float = 1.0,
) -> DataSplits:
    """Read a torchvision image data set from ``data_dir`` and split it as DeepOBS does.

    Args:
        dataset: One of :data:`IMAGE_DATASETS`.
        data_dir: The torchvision root (e.g. MNIST in ``data_dir/MNIST/raw/``, CIFAR-10 in
            ``data_dir/cifar-10-batches-py/``, SVHN in ``data_dir/train_32x32.mat``).
        download: Let torchvision download missing files (and verify their checksums).
        seed: Seeds the train / valid / train_eval split.
        valid_size: Examples held out of the training set; ``None`` means DeepOBS's 10,000
            (or a fifth of a smaller training set).
        train_subset: Keep only this many training examples; ``None`` keeps all.
        augment: Apply DeepOBS's training-time augmentation to ``train`` (CIFAR and SVHN only).
        input_scale: Factor on the final inputs (255 reproduces "inputs in [0, 255]").

    Returns:
        The four splits. Items are ``(image, label)``: image float32 ``[1, 28, 28]`` in [0, 1]
        for MNIST and Fashion-MNIST, normalised ``[3, 32, 32]`` for CIFAR and SVHN (times
        ``input_scale``); label an int64 scalar tensor (SVHN's digit 0 is label 0).

    Raises:
        CockpitError: For an unknown data set, missing files, or unreadable files.
    """
    if dataset not in IMAGE_DATASETS:
        raise unknown_name_error("image data set", dataset, IMAGE_DATASETS)
    source = SOURCES[dataset]
    mean, std = NORMALIZATION.get(dataset, (None, None))
    train_images, train_labels = read_split(source, Path(data_dir), train=True, download=download)
    test_images, test_labels = read_split(source, Path(data_dir), train=False, download=download)

    def make(images: Tensor, labels: Tensor, augmentation: v2.Transform | None = None) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, mean, std, input_scale, augmentation)

    train_plain = make(train_images, train_labels)
    augmentation = deepobs_augmentation(dataset) if augment else None
    train_augmented = train_plain if augmentation is None else make(train_images, train_labels, augmentation)
    test = make(test_images, test_labels)
    return split_train_set(train_augmented, train_plain, test, seed, valid_size=valid_size, train_subset=train_subset)
