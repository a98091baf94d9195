"""Writers of tiny image data sets in the official on-disk formats, for tests without downloads.

Each writer draws random uint8 images and labels, writes them where torchvision looks for them
under ``root`` and returns what it wrote as :class:`FakeImages`, in the layout the loaders
produce: images ``[N, C, H, W]`` uint8, labels ``[N]`` int64 in ``0 .. classes - 1``.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FakeImages:
    """What a writer put on disk.

    Attributes:
        train_images: ``[N_train, C, H, W]`` uint8.
        train_labels: ``[N_train]`` int64.
        test_images: ``[N_test, C, H, W]`` uint8.
        test_labels: ``[N_test]`` int64.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _draw(n_train: int, n_test: int, shape: tuple[int, int, int], classes: int, seed: int) -> FakeImages:
    rng = np.random.default_rng(seed)
    return FakeImages(
        train_images=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        train_labels=rng.integers(0, classes, n_train, dtype=np.int64),
        test_images=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        test_labels=rng.integers(0, classes, n_test, dtype=np.int64),
    )


def _splits(fake: FakeImages, train_name: str, test_name: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(train_name, fake.train_images, fake.train_labels), (test_name, fake.test_images, fake.test_labels)]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format: magic ``0x00000800 + ndim``, big-endian sizes, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int, n_test: int, variant: str = "MNIST", seed: int = 0) -> FakeImages:
    """Write ``root/<variant>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Args:
        root: The ``data_dir``.
        variant: ``"MNIST"`` or ``"FashionMNIST"`` (torchvision's folder names).
    """
    if variant not in ("MNIST", "FashionMNIST"):
        raise ValueError(f"unknown variant {variant!r}")
    fake = _draw(n_train, n_test, (1, 28, 28), 10, seed)
    raw = Path(root) / variant / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, images, labels in _splits(fake, "train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return fake


def _cifar_batch(images: np.ndarray, labels: np.ndarray, label_key: str, name: str, extra: dict) -> dict:
    # One row per image: 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major.
    return {
        "batch_label": name,
        label_key: [int(label) for label in labels],
        "data": images.reshape(len(images), 3 * 32 * 32),
        "filenames": [f"fake_{i:05d}.png" for i in range(len(images))],
        **extra,
    }


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def write_fake_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> FakeImages:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    The training images are spread over the five batches in order.
    """
    fake = _draw(n_train, n_test, (3, 32, 32), 10, seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(n_train), 5)
    for number, part in enumerate(parts, start=1):
        name = f"training batch {number} of 5"
        batch = _cifar_batch(fake.train_images[part], fake.train_labels[part], "labels", name, {})
        _pickle(folder / f"data_batch_{number}", batch)
    test = _cifar_batch(fake.test_images, fake.test_labels, "labels", "testing batch 1 of 1", {})
    _pickle(folder / "test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})
    return fake


def write_fake_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> FakeImages:
    """Write ``root/cifar-100-python/{train, test, meta}`` with fine (0..99) and coarse labels."""
    fake = _draw(n_train, n_test, (3, 32, 32), 100, seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels in _splits(fake, "train", "test"):
        coarse = {"coarse_labels": [int(label) // 5 for label in labels]}
        _pickle(folder / name, _cifar_batch(images, labels, "fine_labels", name, coarse))
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)], "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    _pickle(folder / "meta", meta)
    return fake


def write_fake_svhn(root: Path, n_train: int, n_test: int, seed: int = 0) -> FakeImages:
    """Write ``root/{train,test}_32x32.mat`` with ``X`` ``[32, 32, 3, N]`` and ``y`` ``[N, 1]``.

    As in the official files, the digit 0 has label 10; the returned labels use 0.
    """
    import scipy.io

    fake = _draw(n_train, n_test, (3, 32, 32), 10, seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for name, images, labels in _splits(fake, "train", "test"):
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # [N, C, H, W] -> [H, W, C, N]
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(Path(root) / f"{name}_32x32.mat", {"X": x, "y": y})
    return fake


WRITERS = {
    "mnist": lambda root, n_train, n_test, seed=0: write_fake_mnist(root, n_train, n_test, "MNIST", seed),
    "fmnist": lambda root, n_train, n_test, seed=0: write_fake_mnist(root, n_train, n_test, "FashionMNIST", seed),
    "cifar10": write_fake_cifar10,
    "cifar100": write_fake_cifar100,
    "svhn": write_fake_svhn,
}
"""Writer per data set name of ``problems.datasets.images.IMAGE_DATASETS``."""
