"""Every registered problem, built on tiny data: size, losses, and the registry's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cockpit_cli.errors import CockpitError
from fakedata import write_fake_cifar10, write_fake_cifar100, write_fake_mnist, write_fake_svhn
from problems import PROBLEMS, ProblemInfo, build_problem, get_problem, register

SMALL = {"valid_size": 8}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_fake_mnist(root, 40, 12)
    write_fake_mnist(root, 40, 12, variant="FashionMNIST")
    write_fake_cifar10(root, 40, 12)
    write_fake_cifar100(root, 40, 12)
    write_fake_svhn(root, 40, 12)
    return root


def options_for(name: str) -> dict:
    return {} if name.startswith(("quadratic", "two_d")) else dict(SMALL)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problem_builds_with_its_advertised_size_and_consistent_losses(name: str, image_dir: Path, data_dir: Path) -> None:
    torch.manual_seed(0)
    folder = image_dir if PROBLEMS[name].info.downloads else data_dir
    problem = build_problem(name, data_dir=folder, seed=0, **options_for(name))
    assert problem.num_parameters() == problem.info.parameters
    inputs, targets = next(iter(torch.utils.data.DataLoader(problem.splits.train, batch_size=4)))
    problem.model.eval()  # dropout off, so the two loss evaluations see the same outputs
    with torch.no_grad():
        outputs = problem.model(inputs)
        mean = problem.loss_function(outputs, targets)
        per_sample = problem.per_sample_loss_function(outputs, targets)
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), mean, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(problem.regularization_loss())
    assert (problem.info.weight_decay > 0) == bool(problem.decayed_parameters)
    for split in ("train", "train_eval", "valid", "test"):
        assert len(problem.splits.get(split)) > 0


def test_there_are_nineteen_problems_including_the_deepobs_set() -> None:
    deepobs = {
        "quadratic_deep", "two_d_rosenbrock", "two_d_beale", "two_d_branin", "mnist_logreg", "mnist_mlp", "mnist_2c2d",
        "mnist_vae", "fmnist_logreg", "fmnist_mlp", "fmnist_2c2d", "fmnist_vae", "cifar10_3c3d", "cifar100_3c3d",
        "cifar100_allcnnc", "svhn_3c3d", "svhn_wrn164",
    }
    assert deepobs | {"mnist1d_mlp", "mnist1d_cnn"} == set(PROBLEMS)
    assert [n for n, e in PROBLEMS.items() if e.info.has_batchnorm] == ["svhn_wrn164"]


def test_unknown_problem_suggests_a_close_name() -> None:
    with pytest.raises(CockpitError) as caught:
        get_problem("mnist_mpl")
    assert caught.value.message == "problem 'mnist_mpl' is unknown; did you mean 'mnist_mlp'?"
    assert caught.value.hint == "`cockpit problems` lists all"


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(ProblemInfo(name="mnist_mlp", dataset="x", model="y", batch_size=1, epochs=1))(lambda **_: None)


def test_unknown_option_is_rejected(data_dir: Path) -> None:
    with pytest.raises(CockpitError, match=r"has no option\(s\) \['colour'\]"):
        build_problem("mnist1d_mlp", data_dir=data_dir, colour="red")


def test_missing_image_data_names_the_files_and_download(tmp_path: Path) -> None:
    with pytest.raises(CockpitError) as caught:
        build_problem("cifar10_3c3d", data_dir=tmp_path)
    assert str(tmp_path) in caught.value.message
    assert "download: true" in caught.value.hint
