"""two_d_rosenbrock, two_d_beale, two_d_branin: DeepOBS's noisy two-dimensional test functions.

The per-sample loss is ``f(u, v) + u x + v y`` with noise ``(x, y) ~ N(0, I)``; the two trainable
parameters are ``u`` and ``v``. The model maps a batch of noise ``[N, 2]`` to the per-sample
losses ``[N]``, so the mean loss is the mean of the model's outputs.

DeepOBS defines these problems in TensorFlow only and gives no default batch size or number of
epochs; 128 and 10 are our choice. The test split is noise drawn with seed 43 (DeepOBS's later
PyTorch data set; its TensorFlow one used zero noise there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from problems.base import Problem, ProblemInfo
from problems.datasets.synthetic import SPLIT_SEEDS, two_d_noise, synthetic_splits
from problems.registry import register

NUM_EXAMPLES = 10_000
BATCH_SIZE = 128
EPOCHS = 10


def rosenbrock(u: Tensor, v: Tensor) -> Tensor:
    """``(1 - u)^2 + 100 (v - u^2)^2``; minimum 0 at ``(1, 1)``."""
    return (1 - u) ** 2 + 100 * (v - u**2) ** 2


def beale(u: Tensor, v: Tensor) -> Tensor:
    """``(1.5 - u + uv)^2 + (2.25 - u + uv^2)^2 + (2.625 - u + uv^3)^2``; minimum 0 at ``(3, 0.5)``."""
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2


def branin(u: Tensor, v: Tensor) -> Tensor:
    """``a (v - b u^2 + c u - r)^2 + s (1 - t) cos(u) + s``; minimum ``5 / (4 pi)`` at ``(pi, 2.275)``.

    With ``a = 1, b = 5.1 / (4 pi^2), c = 5 / pi, r = 6, s = 10, t = 1 / (8 pi)``; the same
    minimum is reached at ``(-pi, 12.275)`` and ``(3 pi, 2.475)``.
    """
    a, b, c, r, s, t = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
    return a * (v - b * u**2 + c * u - r) ** 2 + s * (1 - t) * torch.cos(u) + s


@dataclass(frozen=True)
class TwoDFunction:
    """One row of the table: a test function, DeepOBS's starting point, and its minimum.

    Attributes:
        name: Problem name, e.g. ``"two_d_rosenbrock"``.
        title: Human name of the function.
        function: ``(u, v) -> f(u, v)`` on tensors of any (matching) shape.
        start: Initial ``(u, v)``.
        minimizer: One global minimiser ``(u*, v*)``.
        minimum: ``f(u*, v*)``.
    """

    name: str
    title: str
    function: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    minimizer: tuple[float, float]
    minimum: float


FUNCTIONS = {
    row.name: row
    for row in (
        TwoDFunction("two_d_rosenbrock", "Rosenbrock", rosenbrock, (-0.5, 1.5), (1.0, 1.0), 0.0),
        TwoDFunction("two_d_beale", "Beale", beale, (-4.5, 4.5), (3.0, 0.5), 0.0),
        TwoDFunction("two_d_branin", "Branin", branin, (2.5, 12.5), (math.pi, 2.275), 5 / (4 * math.pi)),
    )
}


class NoisyTwoD(nn.Module):
    """Holds ``(u, v)`` and maps noise ``[N, 2]`` to the per-sample losses ``[N]``.

    Args:
        spec: The test function and its starting point.

    Attributes:
        u: Scalar parameter (shape ``()``).
        v: Scalar parameter (shape ``()``).
    """

    def __init__(self, spec: TwoDFunction) -> None:
        super().__init__()
        self.title = spec.title
        self.function = spec.function
        self.u = nn.Parameter(torch.tensor(spec.start[0]))
        self.v = nn.Parameter(torch.tensor(spec.start[1]))

    def forward(self, noise: Tensor) -> Tensor:
        """Return ``f(u, v) + u x + v y`` for each row ``(x, y)`` of ``noise [N, 2]``: ``[N]``."""
        return self.function(self.u, self.v) + self.u * noise[:, 0] + self.v * noise[:, 1]

    def extra_repr(self) -> str:
        return f"{self.title}, u={self.u.item():.4g}, v={self.v.item():.4g}"


class MeanOutput(nn.Module):
    """Mean loss of a model whose outputs are per-sample losses: ``[N], any -> scalar``."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs.mean()


class OutputAsLoss(nn.Module):
    """Per-sample losses of a model whose outputs are per-sample losses: ``[N], any -> [N]``."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs


def _info(spec: TwoDFunction) -> ProblemInfo:
    u, v = spec.start
    return ProblemInfo(
        name=spec.name,
        dataset="2-D noise",
        model=f"noisy {spec.title} function, 2 parameters, start ({u}, {v})",
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        has_accuracy=False,
        parameters=2,
        notes=f"batch {BATCH_SIZE} / {EPOCHS} epochs are our choice (DeepOBS has none); 10,000 samples per split",
    )


def build_two_d(spec: TwoDFunction) -> Problem:
    """Build the noisy two-dimensional problem of ``spec``; items are ``(noise [2], 0.0)``."""
    splits = synthetic_splits(*(two_d_noise(SPLIT_SEEDS[split], NUM_EXAMPLES) for split in ("train", "valid", "test")))
    return Problem(
        info=_info(spec),
        model=NoisyTwoD(spec),
        loss_function=MeanOutput(),
        per_sample_loss_function=OutputAsLoss(),
        splits=splits,
    )


def _register(spec: TwoDFunction) -> None:
    def factory(*, data_dir: Path, download: bool, seed: int) -> Problem:
        """Build the problem; the data are the same for every seed (DeepOBS's fixed seeds)."""
        return build_two_d(spec)

    factory.__name__ = factory.__qualname__ = spec.name
    register(_info(spec))(factory)


for _spec in FUNCTIONS.values():
    _register(_spec)
