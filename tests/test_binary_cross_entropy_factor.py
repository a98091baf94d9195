"""The Hessian factor of BCEWithLogitsLoss, for every output shape and option of the loss."""

from __future__ import annotations

import pytest
import torch

from cockpit_cli.instruments.binary_cross_entropy_factor import BinaryCrossEntropyDerivatives

OPTIONS = {
    "one output, hard targets": ((1,), {}, False),
    "several outputs, soft targets": ((4,), {}, True),
    "weights": ((4,), {"weight": torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)}, False),
    "positive weights": ((4,), {"pos_weight": torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=torch.float64)}, True),
    "summed": ((4,), {"reduction": "sum", "pos_weight": torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=torch.float64)}, False),
    "extra axis": ((2, 3), {}, True),
}


def stored_loss(name: str, scale: float = 2.0) -> tuple[torch.nn.BCEWithLogitsLoss, torch.Tensor, torch.Tensor]:
    """A loss of ``OPTIONS[name]`` with its inputs (6 samples, logits of about ``scale``) stored as
    BackPACK's hook stores them."""
    shape, options, soft = OPTIONS[name]
    samples = 6
    generator = torch.Generator().manual_seed(7)
    logits = scale * torch.randn(samples, *shape, generator=generator, dtype=torch.float64)
    targets = torch.rand(samples, *shape, generator=generator, dtype=torch.float64)
    targets = targets if soft else targets.round()
    loss = torch.nn.BCEWithLogitsLoss(**options)
    loss.input0, loss.input1, loss.output = logits, targets, loss(logits, targets)
    return loss, logits, targets


def per_sample_hessians(loss: torch.nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Autograd's Hessian of the loss with respect to each sample's outputs, ``[N, K, K]``."""
    samples, width = len(logits), logits[0].numel()
    hessian = torch.autograd.functional.hessian(lambda z: loss(z, targets), logits).reshape(samples, width, samples, width)
    return torch.stack([hessian[n, :, n, :] for n in range(samples)])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_factor_squares_to_the_loss_s_hessian(name: str) -> None:
    loss, logits, targets = stored_loss(name)
    factor = BinaryCrossEntropyDerivatives().sqrt_hessian(loss, None, None)
    assert factor.shape == (logits[0].numel(), *logits.shape)
    columns = factor.flatten(2)  # [V, N, K]
    squared = torch.einsum("vni,vnj->nij", columns, columns)
    expected = per_sample_hessians(loss, logits, targets)
    torch.testing.assert_close(squared, expected, rtol=1e-12, atol=1e-15)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sampled_factor_squares_to_the_loss_s_hessian_on_average(name: str) -> None:
    """Each sampled column is ``sigma - y`` for a drawn target ``y`` in {0, 1}, weighted like the
    loss; the mean of their squares approaches the Hessian (20000 draws: within 5%)."""
    loss, logits, targets = stored_loss(name, scale=1.0)
    draws = 20000
    torch.manual_seed(0)
    factor = BinaryCrossEntropyDerivatives().sqrt_hessian_sampled(loss, None, None, mc_samples=draws)
    assert factor.shape == (draws, *logits.shape)
    expected = per_sample_hessians(loss, logits, targets)
    diagonal = torch.stack([h.diagonal() for h in expected]).reshape(logits.shape)  # [N, ...]
    scaled = factor * draws**0.5 / diagonal.div(torch.sigmoid(logits) * torch.sigmoid(-logits)).sqrt()  # sigma - y
    drawn = torch.sigmoid(logits) - scaled
    torch.testing.assert_close(drawn, drawn.round(), rtol=0, atol=1e-12)  # every target drawn is 0 or 1
    torch.testing.assert_close(factor.square().sum(0), diagonal, rtol=0.05, atol=0)
