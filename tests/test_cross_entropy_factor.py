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
    loss.input0, loss.input1, loss.output = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2]), torch.zeros((), dtype=torch.float64)  # what BackPACK's hook stores
    factor = ReducedCrossEntropyDerivatives().sqrt_hessian(loss, None, None)
    assert factor.shape == (3, 5, 4)
    squared = torch.einsum("vnc,vnd->ncd", factor, factor)
    torch.testing.assert_close(squared, loss_hessians(torch.softmax(loss.input0, 1)) / 5, rtol=0, atol=1e-15)
    loss.input0, loss.input1 = torch.randn(5, 4, 2, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.long)  # a class axis and an extra axis: BackPACK's own factor
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


WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
# Options of the loss that change the weight of each position's Hessian (ignored targets are
# written as the loss's ignore_index; "soft" targets are class probabilities).
LOSS_OPTIONS = {
    "class weights": {"weight": WEIGHTS},
    "ignored targets": {},
    "another ignore_index": {"ignore_index": 1},
    "label smoothing and ignored targets": {"label_smoothing": 0.2},
    "everything": {"weight": WEIGHTS, "label_smoothing": 0.2, "ignore_index": 2},
    "summed with class weights": {"weight": WEIGHTS, "reduction": "sum"},
    "soft targets": {"label_smoothing": 0.1, "soft": True},
}


def option_targets(options: dict, shape: tuple[int, ...], classes: int, generator: torch.Generator) -> torch.Tensor:
    """Targets for ``LOSS_OPTIONS``: classes with some positions at the ignore_index, or probabilities."""
    if options.get("soft"):
        return torch.softmax(torch.randn(shape[0], classes, *shape[1:], generator=generator, dtype=torch.float64), dim=1)
    targets = torch.randint(0, classes, shape, generator=generator)
    ignore = options.get("ignore_index", -100)
    targets.view(-1)[:: 3] = ignore  # a third of the positions
    return targets


def option_loss(options: dict) -> torch.nn.CrossEntropyLoss:
    return torch.nn.CrossEntropyLoss(**{key: value for key, value in options.items() if key != "soft"})


@pytest.mark.parametrize("extra", [(), (3,)], ids=["[N, C]", "[N, C, T]"])
@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_factor_of_every_loss_option_squares_to_the_loss_s_hessian(name: str, extra: tuple[int, ...]) -> None:
    """Class weights, ignored targets, label smoothing, sums and soft targets: S S^T is the
    Hessian of the very loss with respect to its logits (autograd's), not the plain mean's."""
    options = LOSS_OPTIONS[name]
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, *extra, generator=generator, dtype=torch.float64)
    targets = option_targets(options, (7, *extra), 4, generator)
    loss = option_loss(options)
    loss.input0, loss.input1, loss.output = logits, targets, loss(logits, targets)  # what BackPACK's hook stores
    factor = ReducedCrossEntropyDerivatives().sqrt_hessian(loss, None, None)  # [V, N, C, *extra]
    per_sample = factor.flatten(2)  # [V, N, C * T]: each sample's block of the Hessian is its own
    squared = torch.einsum("vni,vnj->nij", per_sample, per_sample)
    width = logits[0].numel()  # C * T
    hessian = torch.autograd.functional.hessian(lambda z: loss(z, targets), logits).reshape(7, width, 7, width)
    expected = torch.stack([hessian[n, :, n, :] for n in range(7)])  # no sample's loss depends on another's logits
    torch.testing.assert_close(squared, expected, rtol=1e-12, atol=1e-15)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_sampled_factor_of_every_loss_option_is_the_plain_one_rescaled(name: str) -> None:
    """The Monte-Carlo factor of a loss with options is the plain mean's, drawn alike, with each
    sample's column scaled by the square root of its Hessian's weight relative to 1 / N."""
    options = LOSS_OPTIONS[name]
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    targets = option_targets(options, (7,), 4, generator)
    factors = []
    for loss, its_targets in ((option_loss(options), targets), (torch.nn.CrossEntropyLoss(), torch.zeros(7, dtype=torch.long))):  # draws read no targets
        loss.input0, loss.input1, loss.output = logits, its_targets, loss(logits, its_targets)
        torch.manual_seed(5)
        factors.append(ReducedCrossEntropyDerivatives().sqrt_hessian_sampled(loss, None, None, mc_samples=6))
    hessian = torch.autograd.functional.hessian(lambda z: option_loss(options)(z, targets), logits)
    probs = torch.softmax(logits, dim=1)
    weights = torch.stack([hessian[n, 0, n, 0] for n in range(7)]) / (probs[:, 0] - probs[:, 0] ** 2)  # a_n
    torch.testing.assert_close(factors[0], factors[1] * (7 * weights).sqrt()[None, :, None], rtol=1e-12, atol=1e-15)
    assert bool((weights == 0).any()) != bool(options.get("soft"))  # the ignored targets' columns are zero
