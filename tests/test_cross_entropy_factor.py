"""The cross-entropy Hessian factor with C - 1 columns."""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact, DiagHessian

from cockpit_cli.instruments.cross_entropy_factor import ReducedCrossEntropyDerivatives, reduced_sqrt_hessian
from cockpit_cli.instruments.curvature_diagonal import curvature_extension


def loss_hessians(probs: torch.Tensor) -> torch.Tensor:
    """``diag(p_n) - p_n p_n^T`` for every sample, ``[N, C, C]``."""
    return torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("sharpness", [0.0, 1.0, 40.0])
def test_factor_squares_to_the_loss_hessian(classes: int, sharpness: float) -> None:
    """S S^T equals diag(p) - p p^T for uniform, moderate and nearly one-hot probabilities."""
    torch.manual_seed(classes)
    probs = torch.softmax(sharpness * torch.randn(6, classes, dtype=torch.float64), dim=1)
    factor = reduced_sqrt_hessian(probs)
    assert factor.shape == (classes - 1, 6, classes)
    squared = torch.einsum("vnc,vnd->ncd", factor, factor)
    torch.testing.assert_close(squared, loss_hessians(probs), rtol=0, atol=1e-14)


def test_factor_of_saturated_probabilities_is_finite() -> None:
    """A saturated float32 softmax is exactly one-hot (its Hessian is zero): the reflection takes
    the unit vector of the smallest probability, never tau itself, and the factor stays finite."""
    probs = torch.softmax(torch.tensor([[150.0, 0.0, 2.0], [0.0, 1.0, 200.0]]), dim=1)
    assert probs.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    factor = reduced_sqrt_hessian(probs)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(torch.einsum("vnc,vnd->ncd", factor, factor), loss_hessians(probs), rtol=0, atol=0)


def test_derivatives_give_the_mean_loss_factor_and_keep_backpack_for_extra_axes() -> None:
    torch.manual_seed(0)
    loss = torch.nn.CrossEntropyLoss()
    loss.input0, loss.output = torch.randn(5, 4, dtype=torch.float64), torch.zeros((), dtype=torch.float64)  # what BackPACK's hook stores
    factor = ReducedCrossEntropyDerivatives().sqrt_hessian(loss, None, None)
    assert factor.shape == (3, 5, 4)
    squared = torch.einsum("vnc,vnd->ncd", factor, factor)
    torch.testing.assert_close(squared, loss_hessians(torch.softmax(loss.input0, 1)) / 5, rtol=0, atol=1e-15)
    loss.input0 = torch.randn(5, 4, 2, dtype=torch.float64)  # a class axis and an extra axis: BackPACK's own factor
    assert ReducedCrossEntropyDerivatives().sqrt_hessian(loss, None, None).shape == (8, 5, 4, 2)


@pytest.mark.parametrize("curvature, stock, attribute", [("hessian", DiagHessian, "diag_h"), ("ggn", DiagGGNExact, "diag_ggn_exact")])
def test_curvature_diagonals_with_the_reduced_factor_equal_backpacks(curvature: str, stock: type, attribute: str) -> None:
    """The extension (with one backpropagated column fewer) gives BackPACK's diagonals."""
    torch.manual_seed(1)
    nn = torch.nn
    model = extend(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double())
    loss_function = extend(nn.CrossEntropyLoss())
    inputs, targets = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
    diagonals = []
    for extension in (stock(), curvature_extension(curvature)):
        with backpack(extension):
            loss_function(model(inputs), targets).backward()
        diagonals.append([getattr(p, attribute).clone() for p in model.parameters()])
    for actual, expected in zip(diagonals[1], diagonals[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)
        assert expected.abs().max() > 0
