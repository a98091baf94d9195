"""The DeepOBS image problems: architecture, initialisation, weight decay, losses, BackPACK, data.

Parameter counts are checked tensor by tensor against the lists in DeepOBS's own tests
(repository fsschneider/DeepOBS); where DeepOBS has no test for a problem, the list is derived
from its network definition, and the comment says so.
"""

from __future__ import annotations

import math

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from torch import nn
from torch.utils.data import DataLoader

from problems import build_problem, get_problem
from problems.datasets.images import load_image_splits
from problems.image_classification import PROBLEM_TABLE as CLASSIFICATION_TABLE
from problems.image_classification import layer_weights
from problems.nets.vae import VAE
from problems.vae import PROBLEM_TABLE as VAE_TABLE
from problems.vae import VAELoss
from fakedata import WRITERS

# --- DeepOBS's numbers ------------------------------------------------------------------------

LOGREG = [784 * 10, 10]  # deepobs/tensorflow/tests/testproblems/test_mnist_logreg.py
MLP = [784 * 1000, 1000, 1000 * 500, 500, 500 * 100, 100, 100 * 10, 10]  # pytorch/tests/.../test_fmnist_mlp.py
C2D2 = [1 * 32 * 5 * 5, 32, 32 * 64 * 5 * 5, 64, 7 * 7 * 64 * 1024, 1024, 1024 * 10, 10]  # .../test_fmnist_2c2d.py


def c3d3(classes: int) -> list[int]:
    """pytorch/tests/.../test_cifar10_3c3d.py for 10 classes; cifar100_3c3d and svhn_3c3d build the
    same net_cifar10_3c3d (deepobs/pytorch/testproblems/{cifar100,svhn}_3c3d.py) with 100 / 10."""
    return [3 * 64 * 5 * 5, 64, 64 * 96 * 3 * 3, 96, 96 * 128 * 3 * 3, 128,
            3 * 3 * 128 * 512, 512, 512 * 256, 256, 256 * classes, classes]


# No DeepOBS test: derived from net_cifar100_allcnnc in deepobs/pytorch/testproblems/testproblems_modules.py.
ALLCNNC = [3 * 96 * 9, 96, 96 * 96 * 9, 96, 96 * 96 * 9, 96, 96 * 192 * 9, 192, 192 * 192 * 9, 192,
           192 * 192 * 9, 192, 192 * 192 * 9, 192, 192 * 192, 192, 192 * 100, 100]
WRN164 = [  # deepobs/pytorch/tests/testproblems/test_svhn_wrn164.py
    3 * 16 * 3 * 3, 16, 16, 16 * 64 * 1 * 1, 16 * 64 * 3 * 3, 64,
    64, 64 * 64 * 3 * 3, 64, 64, 64 * 64 * 3 * 3, 64, 64,
    64 * 64 * 3 * 3, 64, 64, 64 * 128 * 1 * 1, 64 * 128 * 3 * 3,
    128, 128, 128 * 128 * 3 * 3, 128, 128, 128 * 128 * 3 * 3, 128,
    128, 128 * 128 * 3 * 3, 128, 128, 128 * 256 * 1 * 1,
    128 * 256 * 3 * 3, 256, 256, 256 * 256 * 3 * 3, 256, 256,
    256 * 256 * 3 * 3, 256, 256, 256 * 256 * 3 * 3, 256, 256,
    256 * 10, 10,
]
VAE_PARAMS = [  # deepobs/pytorch/tests/testproblems/test_{mnist,fmnist}_vae.py
    1 * 64 * 4 * 4, 64, 64 * 64 * 4 * 4, 64, 64 * 64 * 4 * 4, 64,
    7 * 7 * 64 * 8, 8, 7 * 7 * 64 * 8, 8, 8 * 24, 24, 24 * 49, 49,
    1 * 64 * 4 * 4, 64, 64 * 64 * 4 * 4, 64, 64 * 64 * 4 * 4, 64,
    14 * 14 * 64 * 28 * 28, 28 * 28,
]

DEEPOBS_PARAMETERS = {
    "mnist_logreg": LOGREG, "fmnist_logreg": LOGREG, "mnist_mlp": MLP, "fmnist_mlp": MLP,
    "mnist_2c2d": C2D2, "fmnist_2c2d": C2D2, "cifar10_3c3d": c3d3(10), "svhn_3c3d": c3d3(10),
    "cifar100_3c3d": c3d3(100), "cifar100_allcnnc": ALLCNNC, "svhn_wrn164": WRN164,
    "mnist_vae": VAE_PARAMS, "fmnist_vae": VAE_PARAMS,
}
# deepobs/config.py DEFAULT_TEST_PROBLEMS_SETTINGS, and our documented choices (None there).
DEEPOBS_DEFAULTS = {
    "mnist_logreg": (128, 50), "mnist_mlp": (128, 100), "mnist_2c2d": (128, 100),
    "fmnist_mlp": (128, 100), "fmnist_2c2d": (128, 100), "cifar10_3c3d": (128, 100),
    "cifar100_allcnnc": (256, 350), "svhn_wrn164": (128, 160),
    "mnist_vae": (64, 50), "fmnist_vae": (64, 100),
}
OUR_CHOICES = {"fmnist_logreg": (128, 50), "cifar100_3c3d": (128, 100), "svhn_3c3d": (128, 100)}
# The problems' l2_reg / weight_decay defaults in deepobs/pytorch/testproblems/<name>.py.
DEEPOBS_L2 = {"cifar10_3c3d": 0.002, "cifar100_3c3d": 0.002, "svhn_3c3d": 0.002,
              "cifar100_allcnnc": 5e-4, "svhn_wrn164": 5e-4}

SPECS = {spec.name: spec for spec in (*CLASSIFICATION_TABLE, *VAE_TABLE)}
NAMES = sorted(SPECS)
AUGMENTED = {"cifar10_3c3d", "cifar100_3c3d", "cifar100_allcnnc", "svhn_3c3d", "svhn_wrn164"}
INPUT_SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32),
                "cifar100": (3, 32, 32), "svhn": (3, 32, 32)}
N_TRAIN, N_TEST, VALID = 40, 12, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("images")
    for write in WRITERS.values():
        write(root, N_TRAIN, N_TEST)
    return root


@pytest.fixture(scope="module")
def problems(data_dir):
    """Every problem, built once on the fake data (model init seeded)."""
    built = {}
    for name in NAMES:
        torch.manual_seed(0)
        built[name] = build_problem(name, data_dir=data_dir, seed=0, valid_size=VALID)
    return built


def random_inputs(name: str, n: int = 2) -> torch.Tensor:
    return torch.rand(n, *INPUT_SHAPES[SPECS[name].dataset])


# --- architecture and metadata ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_deepobs(problems, name):
    problem = problems[name]
    assert [p.numel() for p in problem.model.parameters()] == DEEPOBS_PARAMETERS[name]
    assert problem.num_parameters() == sum(DEEPOBS_PARAMETERS[name]) == problem.info.parameters


def test_cifar10_3c3d_has_895210_parameters(problems):
    assert problems["cifar10_3c3d"].num_parameters() == 895_210


@pytest.mark.parametrize("name", NAMES)
def test_info_defaults_and_options(name):
    entry = get_problem(name)
    info = entry.info
    assert (info.batch_size, info.epochs) == {**DEEPOBS_DEFAULTS, **OUR_CHOICES}[name]
    if name in OUR_CHOICES:
        assert "no default" in info.notes
    assert info.weight_decay == DEEPOBS_L2.get(name, 0.0)
    assert info.downloads and info.has_accuracy == (not name.endswith("_vae"))
    assert info.has_batchnorm == (name == "svhn_wrn164")
    expected = {"valid_size": None, "train_subset": None, "input_scale": 1.0}
    if name in AUGMENTED:
        expected["augment"] = True
    assert entry.option_defaults() == expected


@pytest.mark.parametrize("name", NAMES)
def test_each_problem_reads_the_data_set_its_name_says(problems, data_dir, name):
    dataset = name.split("_")[0]  # mnist, fmnist, cifar10, cifar100, svhn
    expected = load_image_splits(dataset, data_dir, download=False, seed=0, valid_size=VALID).test[0][0]
    assert torch.equal(problems[name].splits.test[0][0], expected)
    titles = {"mnist": "MNIST", "fmnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
    assert problems[name].info.dataset == titles[dataset]


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(problems, name):
    model = problems[name].model.eval()
    with torch.no_grad():
        outputs = model(random_inputs(name))
    if name.endswith("_vae"):
        reconstruction, mean, log_std = outputs
        assert reconstruction.shape == (2, 1, 28, 28) and mean.shape == log_std.shape == (2, 8)
        assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    else:
        classes = 100 if SPECS[name].dataset == "cifar100" else 10
        assert outputs.shape == (2, classes)


# --- initialisation ------------------------------------------------------------------------------


def _weights_and_biases(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    return [m.weight for m in layers], [m.bias for m in layers if m.bias is not None]


def test_logreg_starts_at_zero(problems):
    assert all(torch.all(p == 0) for p in problems["mnist_logreg"].model.parameters())


def test_mlp_truncated_normal_init(problems):
    weights, biases = _weights_and_biases(problems["mnist_mlp"].model)
    flat = torch.cat([w.flatten() for w in weights])
    assert flat.abs().max() <= 0.06  # cut at two standard deviations
    # std of N(0, 0.03^2) truncated at +-2 std: 0.03 * 0.8796
    assert flat.std().item() == pytest.approx(0.03 * 0.8796, rel=0.02)
    assert all(torch.all(b == 0) for b in biases)


def test_2c2d_init(problems):
    weights, biases = _weights_and_biases(problems["fmnist_2c2d"].model)
    assert all(w.abs().max() <= 0.1 for w in weights)
    assert all(torch.allclose(b, torch.full_like(b, 0.05)) for b in biases)


def test_allcnnc_biases_and_3c3d_biases(problems):
    _, biases = _weights_and_biases(problems["cifar100_allcnnc"].model)
    assert len(biases) == 9 and all(torch.allclose(b, torch.full_like(b, 0.1)) for b in biases)
    _, biases = _weights_and_biases(problems["cifar10_3c3d"].model)
    assert all(torch.all(b == 0) for b in biases)


def test_wrn_batchnorm():
    from problems.nets.wrn import wide_resnet

    norms = [m for m in wide_resnet().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 13
    assert all(m.momentum == 0.1 and torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)


# --- weight decay --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_decayed_parameters(problems, name):
    problem = problems[name]
    decayed = {id(p) for p in problem.decayed_parameters}
    names = {n for n, p in problem.model.named_parameters() if id(p) in decayed}
    assert len(names) == len(problem.decayed_parameters)
    assert problem.weight_decay == DEEPOBS_L2.get(name, 0.0)
    if name not in DEEPOBS_L2:
        assert names == set()
    elif name == "svhn_wrn164":  # conv and dense weights, not BatchNorm's scale, no biases
        bn = {n for n, _ in problem.model.named_parameters() if ".bn" in f".{n}"}
        expected = {n for n, _ in problem.model.named_parameters() if n.endswith("weight")} - bn
        assert names == expected and len(names) == 1 + 3 * (2 + 3) + 1
    else:  # every weight, no bias
        assert names == {n for n, _ in problem.model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        squared = sum(float(p.pow(2).sum()) for p in problem.decayed_parameters)
        assert problem.regularization_loss().item() == pytest.approx(0.5 * problem.weight_decay * squared, rel=1e-5)


def test_layer_weights_skip_biases():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    assert [id(p) for p in layer_weights(model)] == [id(model[0].weight), id(model[3].weight)]


# --- VAE loss ------------------------------------------------------------------------------------


def test_vae_loss_by_hand():
    reconstruction = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    targets = torch.tensor([[1.0, 1.0], [0.5, 0.25]])
    mean = torch.tensor([[0.0], [1.0]])
    log_std = torch.tensor([[0.0], [math.log(2.0)]])
    outputs = (reconstruction, mean, log_std)
    # example 0: 0.25 + KL(N(0,1)||N(0,1)) = 0.25
    # example 1: 0.25 - 0.5 * (1 + 2 log 2 - 1 - 4) = 0.25 + 2 - log 2
    expected = torch.tensor([0.25, 2.25 - math.log(2.0)])
    per_sample = VAELoss("none")(outputs, targets)
    assert torch.allclose(per_sample, expected)
    assert VAELoss()(outputs, targets).item() == pytest.approx(expected.mean().item())


def test_vae_per_sample_mean_equals_mean(problems):
    problem = problems["mnist_vae"]
    x = random_inputs("mnist_vae", 4)
    torch.manual_seed(1)
    outputs = problem.model.eval()(x)
    per_sample = problem.per_sample_loss_function(outputs, x)
    assert per_sample.shape == (4,)
    assert per_sample.mean().item() == pytest.approx(problem.loss_function(outputs, x).item(), rel=1e-6)


# --- BackPACK ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "svhn_wrn164"])
def test_backpack_batch_grad(problems, name):
    torch.manual_seed(0)
    model = extend(VAE() if name.endswith("_vae") else SPECS[name].network()).train()
    x = random_inputs(name, 2)
    if name.endswith("_vae"):
        loss = VAELoss()(model(x), x)
    else:
        classes = 100 if SPECS[name].dataset == "cifar100" else 10
        loss = extend(nn.CrossEntropyLoss())(model(x), torch.randint(0, classes, (2,)))
    with backpack(BatchGrad()):
        loss.backward()
    for p in model.parameters():
        assert p.grad_batch.shape == (2, *p.shape)
        assert torch.allclose(p.grad_batch.sum(0), p.grad, atol=1e-6, rtol=1e-4)


# --- data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_fake_data(problems, name):
    problem = problems[name]
    assert len(problem.splits.valid) == VALID
    inputs, targets = next(iter(DataLoader(problem.splits.train, batch_size=2)))
    assert inputs.shape == (2, *INPUT_SHAPES[SPECS[name].dataset])
    if name.endswith("_vae"):
        assert torch.equal(inputs, targets)
    else:
        assert targets.dtype == torch.int64
    problem.model.train()
    problem.model.zero_grad()
    outputs = problem.model(inputs)
    loss = problem.loss_function(outputs, targets) + problem.regularization_loss()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in problem.model.parameters())
    assert problem.per_sample_loss_function(outputs, targets).shape == (2,)
