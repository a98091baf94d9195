"""mnist1d_mlp and mnist1d_cnn: data, cache, options, BackPACK and a little training."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from torch import nn
from torch.utils.data import DataLoader

from cockpit_cli.errors import CockpitError
from problems import build_problem
from problems.datasets import mnist1d as mnist1d_data

NAMES = ("mnist1d_mlp", "mnist1d_cnn")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Generate the data set once; record the global generator states around the generation."""
    data_dir = tmp_path_factory.mktemp("data")
    random.seed(7)  # not the generation's seed (42), which an earlier test may have left in place
    np.random.seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy())
    arrays = mnist1d_data.load_mnist1d(data_dir)
    after = (random.getstate(), np.random.get_state()[1].copy())
    return data_dir, arrays, before, after


@pytest.fixture()
def data_dir(generated):
    return generated[0]


def build(name: str, data_dir: Path, **options):
    torch.manual_seed(0)
    return build_problem(name, data_dir, seed=0, **options)


def first_batch(dataset, size: int = 32):
    return next(iter(DataLoader(dataset, batch_size=size)))


def forbid_generation(monkeypatch):
    def fail():
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mnist1d_data, "_generate", fail)


# data ---------------------------------------------------------------------------------------------


def test_arrays_shapes_and_types(generated):
    _, arrays, _, _ = generated
    assert arrays.x_train.shape == (8000, 40) and arrays.x_train.dtype == torch.float32
    assert arrays.y_train.shape == (8000,) and arrays.y_train.dtype == torch.int64
    assert arrays.x_test.shape == (2000, 40) and arrays.x_test.dtype == torch.float32
    assert arrays.y_test.shape == (2000,) and arrays.y_test.dtype == torch.int64
    assert set(arrays.y_train.unique().tolist()) == set(range(10))


def test_generation_leaves_global_generators_alone(generated):
    _, _, (python_before, numpy_before), (python_after, numpy_after) = generated
    assert python_before == python_after
    assert np.array_equal(numpy_before, numpy_after)


@pytest.mark.parametrize("name", NAMES)
def test_splits_and_output_shapes(name, data_dir):
    problem = build(name, data_dir)
    sizes = {split: len(problem.splits.get(split)) for split in ("train", "train_eval", "valid", "test")}
    assert sizes == {"train": 6400, "train_eval": 1600, "valid": 1600, "test": 2000}
    inputs, labels = first_batch(problem.splits.train)
    assert inputs.shape == (32, 40) and labels.shape == (32,)
    outputs = problem.model(inputs)
    assert outputs.shape == (32, 10)
    per_sample = problem.per_sample_loss_function(outputs, labels)
    assert per_sample.shape == (32,)
    torch.testing.assert_close(per_sample.mean(), problem.loss_function(outputs, labels))
    assert 0 <= problem.correct(outputs, labels) <= 32
    info = problem.info
    assert (info.dataset, info.batch_size, info.epochs, info.downloads) == ("MNIST-1D", 100, 20, False)


# cache --------------------------------------------------------------------------------------------


def test_second_build_reads_the_cache(generated, monkeypatch, tmp_path):
    data_dir, arrays, _, _ = generated
    monkeypatch.chdir(tmp_path)
    forbid_generation(monkeypatch)
    again = mnist1d_data.load_mnist1d(data_dir)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, key), getattr(arrays, key))
    files = sorted(path.name for path in (data_dir / "mnist1d").iterdir())
    assert files == [mnist1d_data.CACHE_NAME]
    assert mnist1d_data.cache_path(data_dir).stat().st_mode & 0o777 == 0o644  # others may read the shared cache
    assert not list(data_dir.rglob("*.pkl")) and not list(tmp_path.rglob("*.pkl"))


@pytest.mark.parametrize("content", [b"", b"not an archive", None], ids=["empty", "garbage", "truncated"])
def test_corrupt_cache_is_regenerated(generated, monkeypatch, tmp_path, content):
    data_dir, arrays, _, _ = generated
    cache = mnist1d_data.cache_path(tmp_path)
    cache.parent.mkdir(parents=True)
    good = mnist1d_data.cache_path(data_dir).read_bytes()
    cache.write_bytes(good[: len(good) // 2] if content is None else content)
    calls = []

    def fake_generate():
        calls.append(1)
        return {key: getattr(arrays, key).numpy() for key in ("x_train", "y_train", "x_test", "y_test")}

    monkeypatch.setattr(mnist1d_data, "_generate", fake_generate)
    with pytest.warns(UserWarning, match="regenerating"):
        loaded = mnist1d_data.load_mnist1d(tmp_path)
    assert calls == [1]
    assert torch.equal(loaded.x_train, arrays.x_train)
    with np.load(cache) as rewritten:
        assert np.array_equal(rewritten["x_train"], arrays.x_train.numpy())
    assert sorted(path.name for path in cache.parent.iterdir()) == [cache.name]


def _wrong_shape(arrays: dict) -> None:
    arrays["x_train"] = np.zeros((3, 40), np.float32)


def _label_out_of_range(arrays: dict) -> None:
    arrays["y_test"][5] = 10


def _not_finite(arrays: dict) -> None:
    arrays["x_test"][7, 3] = np.nan


@pytest.mark.parametrize("damage", [_wrong_shape, _label_out_of_range, _not_finite])
def test_cache_with_wrong_contents_is_regenerated(generated, monkeypatch, tmp_path, damage):
    data_dir, _, _, _ = generated
    good = dict(np.load(mnist1d_data.cache_path(data_dir)))
    bad = {key: array.copy() for key, array in good.items()}
    damage(bad)
    cache = mnist1d_data.cache_path(tmp_path)
    cache.parent.mkdir(parents=True)
    np.savez(cache, **bad)
    monkeypatch.setattr(mnist1d_data, "_generate", lambda: good)
    with pytest.warns(UserWarning, match="unexpected contents"):
        loaded = mnist1d_data.load_mnist1d(tmp_path)
    assert loaded.x_train.shape == (8000, 40) and torch.equal(loaded.y_test, torch.from_numpy(good["y_test"]))
    assert torch.isfinite(loaded.x_test).all()


# options ------------------------------------------------------------------------------------------


def test_input_scale_scales_inputs(data_dir):
    plain = build("mnist1d_mlp", data_dir)
    scaled = build("mnist1d_mlp", data_dir, input_scale=255.0)
    for split in ("train", "valid", "test"):
        torch.testing.assert_close(first_batch(scaled.splits.get(split))[0], 255.0 * first_batch(plain.splits.get(split))[0])


def test_train_subset_and_valid_size(data_dir):
    problem = build("mnist1d_cnn", data_dir, train_subset=500, valid_size=1000)
    assert (len(problem.splits.train), len(problem.splits.train_eval), len(problem.splits.valid)) == (500, 500, 1000)
    everything = build("mnist1d_mlp", data_dir, train_subset=6400)  # all that the default valid_size of 1600 leaves
    assert (len(everything.splits.train), len(everything.splits.valid)) == (6400, 1600)


@pytest.mark.parametrize("activation, module", [("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh), ("leaky_relu", nn.LeakyReLU)])
@pytest.mark.parametrize("name", NAMES)
def test_activation_changes_modules(name, data_dir, activation, module):
    model = build(name, data_dir, activation=activation).model
    assert any(isinstance(m, module) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_depth_and_width_change_parameter_counts(data_dir):
    def mlp_count(depth, width):
        return (40 * width + width) + (depth - 1) * (width * width + width) + (width * 10 + 10)

    assert build("mnist1d_mlp", data_dir).num_parameters() == mlp_count(2, 100) == 15_210
    assert build("mnist1d_mlp", data_dir, depth=4, width=30).num_parameters() == mlp_count(4, 30)
    assert build("mnist1d_cnn", data_dir).num_parameters() == 192 + 2 * 5152 + 1610
    # width 8, depth 2: conv 1->8 (48), conv 8->8 (328), length 40 -> 20 -> 10, head 80 -> 10 (810)
    small = build("mnist1d_cnn", data_dir, depth=2, width=8)
    assert small.num_parameters() == 48 + 328 + 810
    assert small.model(torch.zeros(3, 40)).shape == (3, 10)
    assert build("mnist1d_cnn", data_dir, depth=7).model(torch.zeros(2, 40)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_init_scale_scales_initial_weights(name, data_dir):
    plain = build(name, data_dir).model
    scaled = build(name, data_dir, init_scale=0.01).model
    for (key, p), q in zip(plain.named_parameters(), scaled.parameters()):
        expected = 0.01 * p if key.endswith("weight") else p
        torch.testing.assert_close(q, expected)


@pytest.mark.parametrize(
    "option, value",
    [
        ("depth", 0),
        ("width", 0),
        ("init_scale", 0.0),
        ("init_scale", -1.0),
        ("init_scale", float("nan")),
        ("init_scale", float("inf")),
        ("activation", "gelu"),
        ("input_scale", 0.0),
        ("input_scale", float("inf")),
        ("input_scale", float("nan")),
        ("train_subset", 100_000),
        ("valid_size", 0),
        ("valid_size", 8000),  # all of the training set: nothing left to train on
    ],
)
def test_bad_options_are_rejected(data_dir, option, value):
    with pytest.raises(CockpitError, match=option) as raised:
        build("mnist1d_mlp", data_dir, **{option: value})
    assert raised.value.hint


def test_unknown_option_is_rejected(data_dir):
    with pytest.raises(CockpitError, match="activaton"):
        build("mnist1d_mlp", data_dir, activaton="relu")


# BackPACK and training ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", NAMES)
def test_backpack_batch_grad(name, data_dir):
    problem = build(name, data_dir)
    model, loss_function = extend(problem.model), extend(problem.loss_function)
    inputs, labels = first_batch(problem.splits.train, 8)
    with backpack(BatchGrad()):
        loss_function(model(inputs), labels).backward()
    first = problem.per_sample_loss_function(model(inputs[:1]), labels[:1]).sum()
    reference = torch.autograd.grad(first, list(model.parameters()))
    for parameter, expected in zip(model.parameters(), reference):
        assert parameter.grad_batch.shape == (8, *parameter.shape)
        torch.testing.assert_close(parameter.grad_batch.sum(dim=0), parameter.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(8 * parameter.grad_batch[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sgd_steps_reduce_the_loss(name, data_dir):
    problem = build(name, data_dir)
    probe_inputs, probe_labels = first_batch(problem.splits.train_eval, 500)

    def probe_loss() -> float:
        with torch.no_grad():
            return problem.loss_function(problem.model(probe_inputs), probe_labels).item()

    start = probe_loss()
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(problem.splits.train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    for step, (inputs, labels) in enumerate(loader):
        optimizer.zero_grad()
        problem.loss_function(problem.model(inputs), labels).backward()
        optimizer.step()
        if step == 30:
            break
    assert probe_loss() < 0.9 * start
