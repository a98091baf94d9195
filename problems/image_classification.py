"""DeepOBS's image classification problems, one table row each.

Every problem is a network from :mod:`problems.nets` trained with mean cross-entropy on one of
the torchvision image data sets. Defaults (batch size, epochs, L2 factor, which parameters the
L2 term applies to, data augmentation) are DeepOBS's; where DeepOBS has no default batch size
and epoch count, the choice made here is said in the problem's notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from torch import nn

from problems.base import Problem, ProblemInfo
from problems.datasets.image_files import SOURCES
from problems.datasets.images import load_image_splits
from problems.nets.conv import all_cnn_c, conv_2c2d, conv_3c3d
from problems.nets.dense import logistic_regression, mlp
from problems.nets.wrn import wide_resnet
from problems.registry import Factory, register

@dataclass(frozen=True)
class ImageProblem:
    """One row of the problem table.

    Attributes:
        name: Registry name.
        dataset: Key for :func:`load_image_splits` (``"mnist"``, ``"cifar10"``, ...).
        network: Builds the freshly initialised network (uses the global torch generator).
        model: Short description of the network.
        batch_size: Default batch size.
        epochs: Default number of epochs.
        parameters: Number of trainable parameters (DeepOBS's; checked by the tests).
        weight_decay: L2 factor on the conv and dense weights (never biases or BatchNorm).
        augments: Whether DeepOBS augments the training data (the ``augment`` option's default).
        has_batchnorm: Whether the network has BatchNorm layers.
        notes: Extra facts for the problem table.
    """

    name: str
    dataset: str
    network: Callable[[], nn.Module]
    model: str
    batch_size: int
    epochs: int
    parameters: int
    weight_decay: float = 0.0
    augments: bool = False
    has_batchnorm: bool = False
    notes: str = ""

    @property
    def info(self) -> ProblemInfo:
        return ProblemInfo(
            name=self.name,
            dataset=SOURCES[self.dataset].title,
            model=self.model,
            batch_size=self.batch_size,
            epochs=self.epochs,
            weight_decay=self.weight_decay,
            has_accuracy=True,
            has_batchnorm=self.has_batchnorm,
            downloads=True,
            notes=self.notes,
            parameters=self.parameters,
        )


LOGREG = "logistic regression 784->10, zero init"
MLP = "MLP 784-1000-500-100-10, ReLU"
C2D2 = "2c2d: conv32-conv64 (5x5, max-pool), dense 1024"
C3D3 = "3c3d: conv64-conv96-conv128 (max-pool), dense 512-256"
NO_DEFAULT = "DeepOBS has no default batch size/epochs; {} chosen by analogy with {}"

PROBLEM_TABLE: tuple[ImageProblem, ...] = (
    ImageProblem("mnist_logreg", "mnist", logistic_regression, LOGREG, 128, 50, 7_850),
    ImageProblem("mnist_mlp", "mnist", mlp, MLP, 128, 100, 1_336_610),
    ImageProblem("mnist_2c2d", "mnist", conv_2c2d, C2D2, 128, 100, 3_274_634),
    ImageProblem(
        "fmnist_logreg", "fmnist", logistic_regression, LOGREG, 128, 50, 7_850,
        notes=NO_DEFAULT.format("128/50", "mnist_logreg"),
    ),
    ImageProblem("fmnist_mlp", "fmnist", mlp, MLP, 128, 100, 1_336_610),
    ImageProblem("fmnist_2c2d", "fmnist", conv_2c2d, C2D2, 128, 100, 3_274_634),
    ImageProblem(
        "cifar10_3c3d", "cifar10", conv_3c3d, C3D3, 128, 100, 895_210, weight_decay=0.002, augments=True,
    ),
    ImageProblem(
        "cifar100_3c3d", "cifar100", partial(conv_3c3d, num_outputs=100), C3D3, 128, 100, 918_340,
        weight_decay=0.002, augments=True, notes=NO_DEFAULT.format("128/100", "cifar10_3c3d"),
    ),
    ImageProblem(
        "cifar100_allcnnc", "cifar100", all_cnn_c, "All-CNN-C: 9 conv layers, dropout 0.2/0.5", 256, 350, 1_387_108,
        weight_decay=5e-4, augments=True,
    ),
    ImageProblem(
        "svhn_3c3d", "svhn", conv_3c3d, C3D3, 128, 100, 895_210, weight_decay=0.002, augments=True,
        notes=NO_DEFAULT.format("128/100", "cifar10_3c3d"),
    ),
    ImageProblem(
        "svhn_wrn164", "svhn", wide_resnet, "wide ResNet 16-4 (BatchNorm)", 128, 160, 2_748_890,
        weight_decay=5e-4, augments=True, has_batchnorm=True,
        notes="BatchNorm decay 0.9 (TensorFlow convention, momentum 0.1 in PyTorch)",
    ),
)


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """Return the weights of the conv and dense layers: what DeepOBS's L2 term applies to.

    Biases and BatchNorm's scale and shift are left out.
    """
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return [module.weight for module in model.modules() if isinstance(module, layers)]


def build_image_problem(
    spec: ImageProblem,
    data_dir: Path,
    download: bool,
    seed: int,
    valid_size: int | None,
    train_subset: int | None,
    augment: bool,
    input_scale: float,
) -> Problem:
    """Build the network (global torch generator) and then the data splits (``seed``)."""
    model = spec.network()
    splits = load_image_splits(
        spec.dataset, data_dir, download, seed,
        valid_size=valid_size, train_subset=train_subset, augment=augment, input_scale=input_scale,
    )
    return Problem(
        info=spec.info,
        model=model,
        loss_function=nn.CrossEntropyLoss(),
        per_sample_loss_function=nn.CrossEntropyLoss(reduction="none"),
        splits=splits,
        weight_decay=spec.weight_decay,
        decayed_parameters=layer_weights(model) if spec.weight_decay else [],
    )


def _make_factory(spec: ImageProblem) -> Factory:
    """Return the registered factory; only problems whose data DeepOBS augments take ``augment``."""
    if spec.augments:

        def factory(
            *,
            data_dir: Path,
            download: bool,
            seed: int,
            valid_size: int | None = None,
            train_subset: int | None = None,
            augment: bool = True,
            input_scale: float = 1.0,
        ) -> Problem:
            return build_image_problem(spec, data_dir, download, seed, valid_size, train_subset, augment, input_scale)

    else:

        def factory(
            *,
            data_dir: Path,
            download: bool,
            seed: int,
            valid_size: int | None = None,
            train_subset: int | None = None,
            input_scale: float = 1.0,
        ) -> Problem:
            return build_image_problem(spec, data_dir, download, seed, valid_size, train_subset, False, input_scale)

    factory.__name__ = factory.__qualname__ = spec.name
    factory.__doc__ = f"Build {spec.name}: {spec.model} on {SOURCES[spec.dataset].title}."
    return factory


for _spec in PROBLEM_TABLE:
    register(_spec.info)(_make_factory(_spec))
