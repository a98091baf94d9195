"""mnist1d_mlp and mnist1d_cnn: small, fast classification problems on MNIST-1D.

These are not DeepOBS problems; they train in seconds on a laptop CPU, which makes them the
quick-start problems and the test bed for provoking training failures on purpose. Their options
change the data (``input_scale``, ``train_subset``, ``valid_size``) and the network
(``activation``, ``depth``, ``width``, ``init_scale``). The default batch size and number of
epochs are our choice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import TensorDataset

from cockpit_cli.errors import CockpitError
from problems.base import DataSplits, Problem, ProblemInfo
from problems.datasets.mnist1d import load_mnist1d
from problems.datasets.splits import split_train_set
from problems.nets.mnist1d_nets import ACTIVATIONS, Activation, cnn, mlp
from problems.registry import register

BATCH_SIZE = 100
EPOCHS = 20
_DEFAULTS_NOTE = f"batch {BATCH_SIZE} / {EPOCHS} epochs are our choice (not DeepOBS)"

MLP_INFO = ProblemInfo(
    name="mnist1d_mlp",
    dataset="MNIST-1D",
    model="MLP 40-100-100-10, ReLU (options depth, width, activation, init_scale)",
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    parameters=15_210,
    notes=f"generated locally, 8000 train / 2000 test; {_DEFAULTS_NOTE}",
)

CNN_INFO = ProblemInfo(
    name="mnist1d_cnn",
    dataset="MNIST-1D",
    model="CNN 3 x conv1d(32, k5, stride 2) + linear, ReLU (options depth, width, activation, init_scale)",
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    parameters=12_106,
    notes=f"generated locally, 8000 train / 2000 test; {_DEFAULTS_NOTE}",
)


def _require(condition: bool, option: str, value: object, requirement: str) -> None:
    """Raise a :class:`CockpitError` naming ``option`` unless ``condition`` holds."""
    if not condition:
        raise CockpitError(f"option {option}={value!r} is invalid: it must be {requirement}", f"set {option} to {requirement}")


def _check_network_options(activation: str, depth: int, width: int, init_scale: float) -> None:
    _require(activation in ACTIVATIONS, "activation", activation, f"one of {sorted(ACTIVATIONS)}")
    _require(isinstance(depth, int) and depth >= 1, "depth", depth, "an integer >= 1")
    _require(isinstance(width, int) and width >= 1, "width", width, "an integer >= 1")
    _require(math.isfinite(init_scale) and init_scale > 0, "init_scale", init_scale, "a finite number > 0")


def mnist1d_splits(
    data_dir: Path, seed: int, valid_size: int | None, train_subset: int | None, input_scale: float
) -> DataSplits:
    """Return MNIST-1D's four splits; items are ``(signal [40] float32, label int64)``.

    Args:
        data_dir: Folder holding (or receiving) the ``mnist1d/`` cache.
        seed: Seeds the choice of the validation examples.
        valid_size: Examples held out of the 8000 training signals (default 1600).
        train_subset: Keep only this many training examples; ``None`` keeps all.
        input_scale: Factor applied to every input signal.
    """
    _require(math.isfinite(input_scale) and input_scale > 0, "input_scale", input_scale, "a finite number > 0")
    arrays = load_mnist1d(data_dir)
    train = TensorDataset(arrays.x_train * input_scale, arrays.y_train)
    test = TensorDataset(arrays.x_test * input_scale, arrays.y_test)
    return split_train_set(train, train, test, seed=seed, valid_size=valid_size, train_subset=train_subset)


def _build(
    info: ProblemInfo,
    network: Callable[..., nn.Sequential],
    *,
    data_dir: Path,
    seed: int,
    valid_size: int | None,
    train_subset: int | None,
    input_scale: float,
    **net_options: Any,
) -> Problem:
    """Check the options, load the data, and build the network (initialised from torch's generator)."""
    _check_network_options(**net_options)
    return Problem(
        info=info,
        model=network(**net_options),
        loss_function=nn.CrossEntropyLoss(),
        per_sample_loss_function=nn.CrossEntropyLoss(reduction="none"),
        splits=mnist1d_splits(data_dir, seed, valid_size, train_subset, input_scale),
    )


@register(MLP_INFO)
def mnist1d_mlp(
    *,
    data_dir: Path,
    download: bool,
    seed: int,
    valid_size: int | None = None,
    train_subset: int | None = None,
    input_scale: float = 1.0,
    activation: Activation = "relu",
    depth: int = 2,
    width: int = 100,
    init_scale: float = 1.0,
) -> Problem:
    """Build mnist1d_mlp: ``depth`` hidden layers of ``width`` units. ``download`` is unused."""
    return _build(
        MLP_INFO, mlp, data_dir=data_dir, seed=seed, valid_size=valid_size, train_subset=train_subset,
        input_scale=input_scale, activation=activation, depth=depth, width=width, init_scale=init_scale,
    )


@register(CNN_INFO)
def mnist1d_cnn(
    *,
    data_dir: Path,
    download: bool,
    seed: int,
    valid_size: int | None = None,
    train_subset: int | None = None,
    input_scale: float = 1.0,
    activation: Activation = "relu",
    depth: int = 3,
    width: int = 32,
    init_scale: float = 1.0,
) -> Problem:
    """Build mnist1d_cnn: ``depth`` strided Conv1d layers of ``width`` channels. ``download`` is unused."""
    return _build(
        CNN_INFO, cnn, data_dir=data_dir, seed=seed, valid_size=valid_size, train_subset=train_subset,
        input_scale=input_scale, activation=activation, depth=depth, width=width, init_scale=init_scale,
    )
