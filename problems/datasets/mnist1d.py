"""MNIST-1D, generated locally with the ``mnist1d`` package and cached as ``.npz``.

The data set is a fixed benchmark: 10,000 signals of length 40 (8,000 train, 2,000 test) drawn
with the package's default generation arguments and seed. Generating takes a couple of seconds,
so the arrays are cached in ``<data_dir>/mnist1d/``. The cache is written to a temporary file and
renamed into place, so a killed process never leaves a half-written file; a cache that cannot be
read or has the wrong shapes is regenerated.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NUM_SAMPLES = 10_000
TRAIN_FRACTION = 0.8
GENERATION_SEED = 42
SIGNAL_LENGTH = 40
NUM_CLASSES = 10
CACHE_NAME = f"mnist1d_n{NUM_SAMPLES}_seed{GENERATION_SEED}.npz"
_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Mnist1dArrays:
    """The official train and test sets.

    Attributes:
        x_train: ``[8000, 40]`` float32 signals.
        y_train: ``[8000]`` int64 labels in ``0 .. 9``.
        x_test: ``[2000, 40]`` float32 signals.
        y_test: ``[2000]`` int64 labels.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def cache_path(data_dir: Path) -> Path:
    """Return where the cached arrays live: ``<data_dir>/mnist1d/<CACHE_NAME>``."""
    return Path(data_dir) / "mnist1d" / CACHE_NAME


def load_mnist1d(data_dir: Path) -> Mnist1dArrays:
    """Return MNIST-1D, read from the cache or generated (and cached) if it is missing or broken."""
    path = cache_path(data_dir)
    arrays = _read_cache(path) if path.exists() else None
    if arrays is None:
        arrays = _generate()
        _write_cache(path, arrays)
    return Mnist1dArrays(**{key: torch.from_numpy(arrays[key]) for key in _KEYS})


def _expected_shapes() -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    train = int(NUM_SAMPLES * TRAIN_FRACTION)
    test = NUM_SAMPLES - train
    float32, int64 = np.dtype(np.float32), np.dtype(np.int64)
    return {
        "x_train": ((train, SIGNAL_LENGTH), float32),
        "y_train": ((train,), int64),
        "x_test": ((test, SIGNAL_LENGTH), float32),
        "y_test": ((test,), int64),
    }


def _is_valid(arrays: dict[str, np.ndarray]) -> bool:
    """Whether ``arrays`` has the four arrays with the right shapes, types and label range."""
    for key, (shape, dtype) in _expected_shapes().items():
        array = arrays.get(key)
        if array is None or array.shape != shape or array.dtype != dtype:
            return False
    labels_ok = all(arrays[key].min() >= 0 and arrays[key].max() < NUM_CLASSES for key in ("y_train", "y_test"))
    return labels_ok and all(np.isfinite(arrays[key]).all() for key in ("x_train", "x_test"))


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or ``None`` (with a warning) if the file is unreadable or wrong."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files if key in _KEYS}
    except Exception as error:  # any unreadable file (bad zip, truncated member, not an npz) is rebuilt
        warnings.warn(f"MNIST-1D cache {path} is unreadable ({error}); regenerating it", stacklevel=3)
        return None
    if not _is_valid(arrays):
        warnings.warn(f"MNIST-1D cache {path} has unexpected contents; regenerating it", stacklevel=3)
        return None
    return arrays


def _generate() -> dict[str, np.ndarray]:
    """Generate the data set with the ``mnist1d`` package, leaving the global generators as they were.

    ``mnist1d`` seeds and draws from Python's and NumPy's global generators; their states are
    saved and restored so that building the problem does not change other random draws.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib), so lazy

    args = get_dataset_args()
    args.num_samples = NUM_SAMPLES
    args.train_split = TRAIN_FRACTION
    args.seed = GENERATION_SEED
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x_train": np.asarray(data["x"], dtype=np.float32),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically; warn (and carry on) if the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    except OSError as error:
        warnings.warn(f"could not cache MNIST-1D in {path.parent} ({error}); it will be regenerated next time", stacklevel=3)
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates the file readable by its owner only
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"could not cache MNIST-1D at {path} ({error}); it will be regenerated next time", stacklevel=3)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
