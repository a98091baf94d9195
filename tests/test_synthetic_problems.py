"""quadratic_deep and the two_d problems: losses, curvature, data and BackPACK."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad

from problems import PROBLEMS, build_problem
from problems.quadratic_deep import quadratic_hessian
from problems.two_d import FUNCTIONS

TWO_D = sorted(FUNCTIONS)


@pytest.fixture(scope="module")
def quadratic():
    return build_problem("quadratic_deep", Path("unused"), seed=0)


def batch(dataset, size: int):
    inputs, targets = zip(*(dataset[i] for i in range(size)))
    return torch.stack(inputs), torch.stack(targets)


def direct_quadratic_losses(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``0.5 (theta - x_i)^T Q (theta - x_i)`` for each row of ``x [N, D]``, in float64."""
    q = quadratic_hessian()
    diff = theta.double() - x.double()
    return 0.5 * torch.einsum("nd,de,ne->n", diff, q, diff)


# quadratic_deep ---------------------------------------------------------------------------------


def test_quadratic_loss_equals_direct_formula(quadratic):
    x, targets = batch(quadratic.splits.train, 64)
    torch.manual_seed(0)
    for theta in (torch.ones(100), torch.randn(100)):
        with torch.no_grad():
            quadratic.model.theta.copy_(theta)
            outputs = quadratic.model(x)
            per_sample = quadratic.per_sample_loss_function(outputs, targets)
            mean = quadratic.loss_function(outputs, targets)
        expected = direct_quadratic_losses(theta, x)
        assert per_sample.shape == (64,)
        torch.testing.assert_close(per_sample.double(), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mean.double(), expected.mean(), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        quadratic.model.theta.fill_(1.0)


def test_quadratic_hessian_spectrum():
    hessian = quadratic_hessian()
    assert hessian.shape == (100, 100)
    torch.testing.assert_close(hessian, hessian.T)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    small, large = eigenvalues[:90], eigenvalues[90:]
    assert small.min() > 0 and small.max() < 1
    assert large.min() > 30 and large.max() < 60


def test_quadratic_spectrum_draws_follow_deepobs_order():
    """DeepOBS draws the 90 small eigenvalues, then the 10 large ones, then the rotation, all
    from one RandomState(42)."""
    from problems.datasets.synthetic import deep_learning_spectrum

    rng = np.random.RandomState(42)
    small, large = rng.uniform(0.0, 1.0, 90), rng.uniform(30.0, 60.0, 10)
    eigenvalues, _ = deep_learning_spectrum(100)
    np.testing.assert_array_equal(eigenvalues, np.concatenate([small, large]))


def test_quadratic_hessian_is_the_loss_curvature(quadratic):
    x, targets = batch(quadratic.splits.train, 32)
    shift, scale = quadratic.model

    def loss_of(theta):
        return quadratic.loss_function(scale(theta - x), targets)

    autograd_hessian = torch.autograd.functional.hessian(loss_of, quadratic.model.theta.detach().clone())
    torch.testing.assert_close(autograd_hessian, quadratic.model.hessian, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(quadratic.model.hessian.double(), quadratic_hessian(), rtol=1e-6, atol=1e-5)


def test_quadratic_same_hessian_and_data_on_every_build(quadratic):
    other = build_problem("quadratic_deep", Path("unused"), seed=123)
    assert torch.equal(other.model.hessian, quadratic.model.hessian)
    assert torch.equal(other.model[1].weight, quadratic.model[1].weight)
    for split in ("train", "train_eval", "valid", "test"):
        assert torch.equal(other.splits.get(split).tensors[0], quadratic.splits.get(split).tensors[0])


def test_quadratic_parameters_and_start(quadratic):
    assert quadratic.num_parameters() == 100
    assert [name for name, p in quadratic.model.named_parameters() if p.requires_grad] == ["0.bias"]
    fresh = build_problem("quadratic_deep", Path("unused"), seed=5)  # the fixture's theta is set by other tests
    assert torch.equal(fresh.model.theta.detach(), torch.ones(100))
    info = quadratic.info
    assert (info.batch_size, info.epochs, info.has_accuracy) == (128, 100, False)


def test_quadratic_splits_follow_deepobs_seeds(quadratic):
    for split, seed in (("train", 42), ("valid", 44), ("test", 43)):
        inputs, targets = quadratic.splits.get(split).tensors
        expected = np.float32(np.random.RandomState(seed).normal(0.0, 0.6, (1000, 100)))
        assert torch.equal(inputs, torch.from_numpy(expected))
        assert torch.equal(targets, torch.zeros(1000, 100))
    assert quadratic.splits.train_eval is quadratic.splits.train


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_quadratic_backpack_per_sample_gradients():
    quadratic = build_problem("quadratic_deep", Path("unused"), seed=0)
    model = extend(quadratic.model)
    loss_function = extend(quadratic.loss_function)
    x, targets = batch(quadratic.splits.valid, 16)
    torch.manual_seed(1)
    theta = torch.randn(100)
    with torch.no_grad():
        model.theta.copy_(theta)
    model.zero_grad()
    loss = loss_function(model(x), targets)
    with backpack(BatchGrad()):
        loss.backward()
    per_sample = model.theta.grad_batch * len(x)  # BatchGrad gives g_i / N under mean reduction
    expected = (theta.double() - x.double()) @ quadratic_hessian()  # Q symmetric: Q (theta - x_i)
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(model.theta.grad.double(), expected.mean(dim=0), rtol=1e-4, atol=1e-3)


# two_d ------------------------------------------------------------------------------------------


def reference_value(name: str, u: float, v: float) -> float:
    """The deterministic test functions, written out with plain floats."""
    if name == "two_d_rosenbrock":
        return (1 - u) ** 2 + 100 * (v - u * u) ** 2
    if name == "two_d_beale":
        return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (v - b * u * u + c * u - 6) ** 2 + 10 * (1 - t) * math.cos(u) + 10


STARTS = {"two_d_rosenbrock": (-0.5, 1.5), "two_d_beale": (-4.5, 4.5), "two_d_branin": (2.5, 12.5)}


@pytest.mark.parametrize("name", TWO_D)
def test_two_d_losses_at_start(name):
    problem = build_problem(name, Path("unused"), seed=0)
    u, v = STARTS[name]
    assert (problem.model.u.item(), problem.model.v.item()) == (u, v)
    noise, targets = batch(problem.splits.train, 8)
    outputs = problem.model(noise)
    expected = torch.tensor([reference_value(name, u, v) + u * x + v * y for x, y in noise.tolist()])
    assert outputs.shape == (8,)
    torch.testing.assert_close(problem.per_sample_loss_function(outputs, targets), expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(problem.loss_function(outputs, targets), expected.mean(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", TWO_D)
def test_two_d_minimum(name):
    spec = FUNCTIONS[name]
    u, v = (torch.tensor(value, dtype=torch.float64) for value in spec.minimizer)
    assert spec.function(u, v).item() == pytest.approx(spec.minimum, abs=1e-6)
    assert reference_value(name, *spec.minimizer) == pytest.approx(spec.minimum, abs=1e-6)
    assert spec.minimum == pytest.approx({"two_d_branin": 0.397887}.get(name, 0.0), abs=1e-6)


def test_two_d_rosenbrock_gradient():
    problem = build_problem("two_d_rosenbrock", Path("unused"), seed=0)
    noise, targets = batch(problem.splits.train, 32)
    problem.loss_function(problem.model(noise), targets).backward()
    u, v = STARTS["two_d_rosenbrock"]
    mean_x, mean_y = noise.mean(dim=0).tolist()
    expected_u = -2 * (1 - u) - 400 * u * (v - u * u) + mean_x
    expected_v = 200 * (v - u * u) + mean_y
    assert problem.model.u.grad.item() == pytest.approx(expected_u, rel=1e-5)
    assert problem.model.v.grad.item() == pytest.approx(expected_v, rel=1e-5)


@pytest.mark.parametrize("name", TWO_D)
def test_two_d_data_and_metadata(name):
    problem = build_problem(name, Path("unused"), seed=7)
    assert problem.num_parameters() == 2
    assert problem.info.has_accuracy is False
    assert (problem.info.batch_size, problem.info.epochs) == (128, 10)
    assert "our choice" in problem.info.notes
    assert PROBLEMS[name].option_defaults() == {}
    for split, seed in (("train", 42), ("valid", 44), ("test", 43)):
        noise, targets = problem.splits.get(split).tensors
        rng = np.random.RandomState(seed)
        x, y = rng.normal(0.0, 1.0, 10_000), rng.normal(0.0, 1.0, 10_000)
        assert torch.equal(noise, torch.from_numpy(np.float32(np.stack([x, y], axis=1))))
        assert torch.equal(targets, torch.zeros(10_000))
    assert problem.splits.train_eval is problem.splits.train
    assert problem.info.dataset == "2-D noise"
    assert problem.correct(problem.model(noise[:4]), targets[:4]) is None
