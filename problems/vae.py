"""DeepOBS's variational autoencoder problems on MNIST and Fashion-MNIST.

The VAE reconstructs its input, so the target of every example is the image itself: the data
splits are wrapped so that each item ``(image, label)`` becomes ``(image, image)``. The model's
output is the tuple ``(reconstruction, mean, log_std)`` and the loss of one example is DeepOBS's

    sum over pixels (reconstruction - image)^2
    - 0.5 * sum over latent dims (1 + 2 log_std - mean^2 - exp(2 log_std)),

the summed squared reconstruction error plus the KL divergence of the approximate posterior
``N(mean, exp(log_std)^2)`` from the standard normal prior. There is no weight decay and no
accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from torch.utils.data import Dataset

from problems.base import DataSplits, Problem, ProblemInfo
from problems.datasets.image_files import SOURCES
from problems.datasets.images import load_image_splits
from problems.nets.vae import VAE
from problems.registry import Factory, register

LATENT = 8
PARAMETERS = 10_151_489  # DeepOBS's (checked by the tests)
MODEL = "VAE: 3 conv (64) / 3 deconv (64), latent 8, leaky ReLU 0.3, dropout 0.2"
NOTES = "targets are the input images; per-example loss = summed squared error + KL"


class VAELoss(nn.Module):
    """DeepOBS's VAE loss: summed squared reconstruction error plus KL divergence per example.

    Args:
        reduction: ``"mean"`` (a scalar: the mean over the batch) or ``"none"`` (``[N]``).
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, outputs: tuple[Tensor, Tensor, Tensor], targets: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            outputs: ``(reconstruction [N, 1, 28, 28], mean [N, L], log_std [N, L])``.
            targets: The input images ``[N, 1, 28, 28]``.

        Returns:
            A scalar for ``"mean"``, else the per-example losses ``[N]``.
        """
        reconstruction, mean, log_std = outputs
        squared_error = (reconstruction - targets).flatten(start_dim=1).pow(2).sum(dim=1)
        kl = -0.5 * (1 + 2 * log_std - mean.pow(2) - (2 * log_std).exp()).sum(dim=1)
        losses = squared_error + kl
        return losses.mean() if self.reduction == "mean" else losses


class ReconstructionTargets(Dataset):
    """A view of an image data set whose items are ``(image, image)`` instead of ``(image, label)``."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, _ = self.images[index]
        return image, image

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Fetch a batch through the wrapped data set's batch access where it has one."""
        fetch = getattr(self.images, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.images[i] for i in indices]
        return [(image, image) for image, _ in items]


@dataclass(frozen=True)
class VAEProblem:
    """One row of the table: a data set and DeepOBS's defaults for it."""

    name: str
    dataset: str
    batch_size: int
    epochs: int

    @property
    def info(self) -> ProblemInfo:
        return ProblemInfo(
            name=self.name,
            dataset=SOURCES[self.dataset].title,
            model=MODEL,
            batch_size=self.batch_size,
            epochs=self.epochs,
            weight_decay=0.0,
            has_accuracy=False,
            has_batchnorm=False,
            downloads=True,
            notes=NOTES,
            parameters=PARAMETERS,
        )


PROBLEM_TABLE = (
    VAEProblem("mnist_vae", "mnist", 64, 50),
    VAEProblem("fmnist_vae", "fmnist", 64, 100),
)


def build_vae_problem(
    spec: VAEProblem,
    data_dir: Path,
    download: bool,
    seed: int,
    valid_size: int | None,
    train_subset: int | None,
    input_scale: float,
) -> Problem:
    """Build the VAE (global torch generator), then the splits (``seed``) with image targets."""
    model = VAE(latent=LATENT)
    splits = load_image_splits(
        spec.dataset, data_dir, download, seed,
        valid_size=valid_size, train_subset=train_subset, augment=False, input_scale=input_scale,
    )
    splits = DataSplits(
        train=ReconstructionTargets(splits.train),
        train_eval=ReconstructionTargets(splits.train_eval),
        valid=ReconstructionTargets(splits.valid),
        test=ReconstructionTargets(splits.test),
    )
    return Problem(
        info=spec.info,
        model=model,
        loss_function=VAELoss("mean"),
        per_sample_loss_function=VAELoss("none"),
        splits=splits,
    )


def _make_factory(spec: VAEProblem) -> Factory:
    def factory(
        *,
        data_dir: Path,
        download: bool,
        seed: int,
        valid_size: int | None = None,
        train_subset: int | None = None,
        input_scale: float = 1.0,
    ) -> Problem:
        return build_vae_problem(spec, data_dir, download, seed, valid_size, train_subset, input_scale)

    factory.__name__ = factory.__qualname__ = spec.name
    factory.__doc__ = f"Build {spec.name}: the DeepOBS VAE on {SOURCES[spec.dataset].title}."
    return factory


for _spec in PROBLEM_TABLE:
    register(_spec.info)(_make_factory(_spec))
