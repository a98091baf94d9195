"""Read the official image files through torchvision, and explain what is wrong when that fails.

Every reader returns plain tensors: ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64
``[N]``. A missing, unreadable or inconsistent file becomes one :class:`CockpitError` that
names the folder and the file.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from cockpit_cli.errors import CockpitError

# What parsing a damaged file can raise (pickle, numpy, scipy.io and torchvision's idx reader).
READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AssertionError, RuntimeError, pickle.UnpicklingError,
)


class _FilesPresentMixin:
    """Relax torchvision's md5 check to "the files exist" when nothing is downloaded.

    torchvision verifies md5 checksums when it downloads a data set (the archive, or the file
    itself for SVHN), and by default again every time the files are opened. The second check
    rejects files that were prepared locally, such as small copies in the same format, so with
    ``download=False`` only the files' presence is checked and their contents are validated by
    parsing them. With ``download=True`` torchvision's own checks apply unchanged.
    """

    def __init__(self, *args: object, download: bool = False, **kwargs: object) -> None:
        self._verify_checksums = download
        super().__init__(*args, download=download, **kwargs)  # type: ignore[call-arg]

    def _check_integrity(self) -> bool:
        if self._verify_checksums:
            return super()._check_integrity()  # type: ignore[misc]
        return all(path.is_file() for path in _expected_paths(self))

    def _load_meta(self) -> None:  # CIFAR only
        if self._verify_checksums:
            return super()._load_meta()  # type: ignore[misc]
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])  # type: ignore[attr-defined]
        with open(path, "rb") as file:
            names = pickle.load(file, encoding="latin1")[self.meta["key"]]  # type: ignore[attr-defined]
        self.classes = names
        self.class_to_idx = {name: i for i, name in enumerate(names)}


class _CIFAR10(_FilesPresentMixin, datasets.CIFAR10):
    pass


class _CIFAR100(_FilesPresentMixin, datasets.CIFAR100):
    pass


class _SVHN(_FilesPresentMixin, datasets.SVHN):
    pass


def _expected_paths(dataset: _FilesPresentMixin) -> list[Path]:
    """The files one split of a CIFAR or SVHN instance reads."""
    if isinstance(dataset, datasets.SVHN):
        return [Path(dataset.root) / dataset.filename]
    folder = Path(dataset.root) / dataset.base_folder  # type: ignore[attr-defined]
    names = [name for name, _ in dataset.train_list + dataset.test_list]  # type: ignore[attr-defined]
    names.append(dataset.meta["filename"])  # type: ignore[attr-defined]
    return [folder / name for name in names]


@dataclass(frozen=True)
class ImageSource:
    """Where one data set lives and how torchvision reads it.

    Attributes:
        title: Human name, e.g. ``"CIFAR-10"``.
        num_classes: Labels lie in ``0 .. num_classes - 1``.
        image_shape: ``[C, H, W]`` of every image.
        subfolder: The folder below ``data_dir`` that holds the files (``""`` for ``data_dir``).
        train_files: File names the training split reads.
        test_files: File names the test split reads.
        read: ``(data_dir, train, download) -> (images [N, C, H, W] uint8, labels [N] int64)``.
        check_file: Parses one file on its own and raises if it is unreadable.
    """

    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    subfolder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    read: Callable[[Path, bool, bool], tuple[Tensor, Tensor]]
    check_file: Callable[[Path], None]

    def folder(self, data_dir: Path) -> Path:
        return Path(data_dir) / self.subfolder if self.subfolder else Path(data_dir)

    def files(self, train: bool | None = None) -> tuple[str, ...]:
        """The file names of one split, or of both (``train=None``) without repeats."""
        if train is None:
            return tuple(dict.fromkeys(self.train_files + self.test_files))
        return self.train_files if train else self.test_files


def _mnist_source(cls: type[datasets.MNIST], title: str) -> ImageSource:
    names = [os.path.splitext(name)[0] for name, _ in cls.resources]

    def read(data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        dataset = cls(data_dir, train=train, download=download)
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()

    def check_file(path: Path) -> None:
        (read_label_file if "labels" in path.name else read_image_file)(str(path))

    return ImageSource(title, 10, (1, 28, 28), f"{cls.__name__}/raw", tuple(n for n in names if n.startswith("train")),
                       tuple(n for n in names if n.startswith("t10k")), read, check_file)


def _cifar_source(cls: type[_CIFAR10], title: str, num_classes: int) -> ImageSource:
    meta = cls.meta["filename"]

    def read(data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        dataset = cls(data_dir, train=train, download=download)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def check_file(path: Path) -> None:
        with open(path, "rb") as file:
            entry = pickle.load(file, encoding="latin1")
        needed = (cls.meta["key"],) if path.name == meta else ("data", "labels" if "labels" in entry else "fine_labels")
        absent = [key for key in needed if key not in entry]
        if absent:
            raise ValueError(f"no '{absent[0]}' entry")
        if path.name == meta:
            return
        data, labels = np.asarray(entry["data"]), entry[needed[1]]
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"expected 'data' of shape [N, 3072] and N labels, got {data.shape} and {len(labels)}")

    return ImageSource(title, num_classes, (3, 32, 32), cls.base_folder, tuple(n for n, _ in cls.train_list) + (meta,),
                       tuple(n for n, _ in cls.test_list) + (meta,), read, check_file)


def _svhn_source() -> ImageSource:
    def read(data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        # torchvision maps SVHN's label 10 (digit 0) to 0 and stores images as [N, C, H, W].
        dataset = _SVHN(data_dir, split="train" if train else "test", download=download)
        return torch.from_numpy(np.ascontiguousarray(dataset.data)), torch.from_numpy(dataset.labels).long()

    def check_file(path: Path) -> None:
        import scipy.io

        mat = scipy.io.loadmat(path)
        if mat["X"].shape[:3] != (32, 32, 3) or mat["X"].shape[3] != mat["y"].size:
            raise ValueError(f"expected X [32, 32, 3, N] and y [N, 1], got {mat['X'].shape} and {mat['y'].shape}")

    return ImageSource("SVHN", 10, (3, 32, 32), "", (_SVHN.split_list["train"][1],), (_SVHN.split_list["test"][1],), read, check_file)


SOURCES: dict[str, ImageSource] = {
    "mnist": _mnist_source(datasets.MNIST, "MNIST"),
    "fmnist": _mnist_source(datasets.FashionMNIST, "Fashion-MNIST"),
    "cifar10": _cifar_source(_CIFAR10, "CIFAR-10", 10),
    "cifar100": _cifar_source(_CIFAR100, "CIFAR-100", 100),
    "svhn": _svhn_source(),
}


def read_split(source: ImageSource, data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """Read the official training (``train=True``) or test split of ``source``.

    Returns:
        ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``.

    Raises:
        CockpitError: When files are missing, cannot be downloaded, or cannot be parsed.
    """
    try:
        images, labels = source.read(Path(data_dir), train, download)
    except READ_ERRORS as error:
        raise _explain_failure(source, Path(data_dir), train, download, error) from error
    files = ", ".join(source.files(train))
    if len(images) != len(labels):
        raise _unreadable(source, data_dir, files, f"{len(images)} images but {len(labels)} labels")
    if tuple(images.shape[1:]) != source.image_shape:
        shape, expected = list(images.shape[1:]), list(source.image_shape)
        raise _unreadable(source, data_dir, files, f"images of shape {shape} where {source.title} has {expected}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < source.num_classes:
        raise _unreadable(source, data_dir, files, f"labels outside 0..{source.num_classes - 1}")
    return images, labels


def _explain_failure(source: ImageSource, data_dir: Path, train: bool, download: bool, error: Exception) -> CockpitError:
    folder = source.folder(data_dir)
    missing = [name for name in source.files() if not (folder / name).is_file()]
    if missing and not download:
        inside = f"{source.subfolder}/ with " if source.subfolder else ""
        return CockpitError(
            f"{source.title} not found in {folder}: missing {', '.join(missing)}",
            "set `problem.download: true` to download it (this needs internet access) or point `problem.data_dir` "
            f"to a folder that has {inside}{', '.join(source.files())}",
        )
    if not missing:
        for name in source.files(train):
            try:
                source.check_file(folder / name)
            except READ_ERRORS as file_error:
                return _unreadable(source, data_dir, name, f"{type(file_error).__name__}: {file_error}")
    if download:
        return CockpitError(
            f"could not download {source.title} into {folder}: {type(error).__name__}: {error}",
            f"check the internet connection, or put {', '.join(source.files())} into {folder} yourself "
            "and set `problem.download: false`",
        )
    return _unreadable(source, data_dir, ", ".join(source.files(train)), f"{type(error).__name__}: {error}")


def _unreadable(source: ImageSource, data_dir: Path, files: str, reason: str) -> CockpitError:
    noun = "files" if "," in files else "file"
    return CockpitError(
        f"cannot read {source.title} {noun} {files} in {source.folder(data_dir)}: {reason}",
        "the file looks corrupted or truncated; delete it and set `problem.download: true` to fetch "
        "it again, or replace it with an intact copy",
    )
