"""The Hessian factors of BCEWithLogitsLoss and MSELoss, for every output shape and option."""

from __future__ import annotations

import pytest
import torch

from cockpit_cli.instruments.elementwise_loss_factor import BinaryCrossEntropyDerivatives, SquaredErrorDerivatives

POS = torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=torch.float64)
# loss, output shape per sample, loss options, soft targets (BCE: probabilities, not 0 or 1)
OPTIONS = {
    "bce one output, hard targets": ("bce", (1,), {}, False),
    "bce one output as [N]": ("bce", (), {}, False),
    "bce several outputs, soft targets": ("bce", (4,), {}, True),
    "bce weights": ("bce", (4,), {"weight": torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)}, False),
    "bce positive weights": ("bce", (4,), {"pos_weight": POS}, True),
    "bce summed": ("bce", (4,), {"reduction": "sum", "pos_weight": POS}, False),
    "bce extra axis": ("bce", (2, 3), {}, True),
    "mse [N, K]": ("mse", (4,), {}, True),
    "mse one output as [N]": ("mse", (), {}, True),
    "mse summed over an extra axis": ("mse", (2, 3), {"reduction": "sum"}, True),
}
DERIVATIVES = {"bce": BinaryCrossEntropyDerivatives, "mse": SquaredErrorDerivatives}


def stored_loss(name: str, scale: float = 2.0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A loss of ``OPTIONS[name]`` with its inputs (6 samples, outputs of about ``scale``) stored
    as BackPACK's hook stores them."""
    kind, shape, options, soft = OPTIONS[name]
    samples = 6
    generator = torch.Generator().manual_seed(7)
    outputs = scale * torch.randn(samples, *shape, generator=generator, dtype=torch.float64)
    targets = torch.rand(samples, *shape, generator=generator, dtype=torch.float64)
    targets = targets if soft else targets.round()
    loss = (torch.nn.BCEWithLogitsLoss if kind == "bce" else torch.nn.MSELoss)(**options)
    loss.input0, loss.input1, loss.output = outputs, targets, loss(outputs, targets)
    return loss, outputs, targets


def per_sample_hessians(loss: torch.nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Autograd's Hessian of the loss with respect to each sample's outputs, ``[N, K, K]``."""
    samples, width = len(outputs), outputs[0].numel()
    hessian = torch.autograd.functional.hessian(lambda z: loss(z, targets), outputs).reshape(samples, width, samples, width)
    return torch.stack([hessian[n, :, n, :] for n in range(samples)])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_factor_squares_to_the_loss_s_hessian(name: str) -> None:
    loss, outputs, targets = stored_loss(name)
    factor = DERIVATIVES[OPTIONS[name][0]]().sqrt_hessian(loss, None, None)
    assert factor.shape == (max(outputs[0].numel(), 1), *outputs.shape)
    columns = factor.reshape(factor.shape[0], len(outputs), -1)  # [V, N, K]
    squared = torch.einsum("vni,vnj->nij", columns, columns)
    expected = per_sample_hessians(loss, outputs, targets)
    torch.testing.assert_close(squared, expected, rtol=1e-12, atol=1e-15)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sampled_factor_squares_to_the_loss_s_hessian_on_average(name: str) -> None:
    """Each drawn column is the gradient of a target drawn from the model's predictive
    distribution (for binary cross-entropy ``sigma - y``, ``y`` 0 or 1), weighted like the loss;
    the mean of their squares approaches the Hessian (20000 draws: within 5%)."""
    kind = OPTIONS[name][0]
    loss, outputs, targets = stored_loss(name, scale=1.0)
    draws = 20000
    torch.manual_seed(0)
    factor = DERIVATIVES[kind]().sqrt_hessian_sampled(loss, None, None, mc_samples=draws)
    assert factor.shape == (draws, *outputs.shape)
    expected = per_sample_hessians(loss, outputs, targets)
    diagonal = torch.stack([h.diagonal() for h in expected]).reshape(outputs.shape)  # [N, ...]
    if kind == "bce":
        scaled = factor * draws**0.5 / diagonal.div(torch.sigmoid(outputs) * torch.sigmoid(-outputs)).sqrt()  # sigma - y
        drawn = torch.sigmoid(outputs) - scaled
        torch.testing.assert_close(drawn, drawn.round(), rtol=0, atol=1e-12)  # every target drawn is 0 or 1
    torch.testing.assert_close(factor.square().sum(0), diagonal, rtol=0.05, atol=0)
