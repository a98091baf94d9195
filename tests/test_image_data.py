"""Image data sets read from tiny files in the official formats, checked against DeepOBS's pipeline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import v2

from cockpit_cli.errors import CockpitError
from fakedata import WRITERS, FakeImages, write_fake_cifar10, write_fake_cifar100, write_fake_mnist, write_fake_svhn
from problems.datasets.image_files import SOURCES
from problems.datasets.images import IMAGE_DATASETS, ImageTensorDataset, deepobs_augmentation, load_image_splits

N_TRAIN, N_TEST, VALID = 40, 12, 8
SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "svhn": (3, 32, 32)}
# DeepOBS's Normalize constants (deepobs/pytorch/datasets/{cifar10,cifar100,svhn}.py), typed out
# here on purpose so that a change in the library shows up as a failing test.
DEEPOBS_NORMALIZE = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    "svhn": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
}


def deepobs_reference(dataset: str, image: np.ndarray) -> torch.Tensor:
    """DeepOBS's test-time pipeline on one uint8 ``[C, H, W]`` image, through PIL like torchvision."""
    if dataset in ("mnist", "fmnist"):
        return transforms.ToTensor()(Image.fromarray(image[0], mode="L"))
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*DEEPOBS_NORMALIZE[dataset])])
    return pipeline(Image.fromarray(image.transpose(1, 2, 0)))


@pytest.fixture(scope="module", params=IMAGE_DATASETS)
def written(request, tmp_path_factory) -> tuple[str, Path, FakeImages]:
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, WRITERS[request.param](root, N_TRAIN, N_TEST, seed=3)


def test_items_have_deepobs_shapes_dtypes_and_values(written):
    name, root, fake = written
    splits = load_image_splits(name, root, download=False, seed=0, valid_size=VALID)
    for split in (splits.train, splits.train_eval, splits.valid, splits.test):
        image, label = split[0]
        assert image.shape == SHAPES[name] and image.dtype == torch.float32
        assert label.dtype == torch.int64 and label.dim() == 0
    for i in range(N_TEST):
        image, label = splits.test[i]
        assert torch.equal(image, deepobs_reference(name, fake.test_images[i]))
        assert int(label) == fake.test_labels[i]
    for position, index in enumerate(splits.valid.indices):
        image, label = splits.valid[position]
        assert torch.equal(image, deepobs_reference(name, fake.train_images[index]))
        assert int(label) == fake.train_labels[index]
    if name in ("mnist", "fmnist"):
        image = splits.test[0][0]
        assert image.min() >= 0 and image.max() <= 1
        assert torch.equal(image, torch.from_numpy(fake.test_images[0]).float() / 255)


def test_labels_cover_digit_zero_for_svhn(tmp_path):
    fake = write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    assert 0 in fake.test_labels  # written to disk as 10
    splits = load_image_splits("svhn", tmp_path, download=False, seed=0, valid_size=VALID)
    labels = [int(splits.test[i][1]) for i in range(N_TEST)]
    assert labels == fake.test_labels.tolist() and max(labels) <= 9


def test_split_sizes_are_disjoint_and_train_eval_comes_from_train(written):
    name, root, _ = written
    splits = load_image_splits(name, root, download=False, seed=1, valid_size=VALID, augment=False)
    train, valid, train_eval = set(splits.train.indices), set(splits.valid.indices), set(splits.train_eval.indices)
    assert len(splits.train) == N_TRAIN - VALID and len(splits.valid) == VALID
    assert len(splits.train_eval) == VALID and len(splits.test) == N_TEST
    assert not train & valid and train | valid == set(range(N_TRAIN))
    assert train_eval <= train


def test_train_subset_shrinks_train_and_train_eval(tmp_path):
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST)
    splits = load_image_splits("mnist", tmp_path, download=False, seed=0, valid_size=VALID, train_subset=5)
    assert len(splits.train) == 5 and len(splits.train_eval) == 5
    assert set(splits.train_eval.indices) == set(splits.train.indices)


def test_split_depends_on_seed_only(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)

    def valid_indices(seed: int) -> list[int]:
        return load_image_splits("cifar10", tmp_path, download=False, seed=seed, valid_size=VALID).valid.indices

    assert valid_indices(5) == valid_indices(5)
    assert valid_indices(5) != valid_indices(6)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_augmentation_only_on_train(tmp_path, name):
    fake = WRITERS[name](tmp_path, N_TRAIN, N_TEST)
    plain = load_image_splits(name, tmp_path, download=False, seed=0, valid_size=VALID, augment=False)
    augmented = load_image_splits(name, tmp_path, download=False, seed=0, valid_size=VALID, augment=True)
    torch.manual_seed(0)
    changed = [not torch.equal(augmented.train[i][0], plain.train[i][0]) for i in range(10)]
    assert all(changed)  # colour jitter alone changes practically every image
    assert augmented.train[0][0].shape == (3, 32, 32) and augmented.train[0][1] == plain.train[0][1]
    for split in ("train_eval", "valid", "test"):
        for i in range(3):
            assert torch.equal(augmented.get(split)[i][0], plain.get(split)[i][0])
    for position, index in enumerate(plain.train.indices[:3]):
        assert torch.equal(plain.train[position][0], deepobs_reference(name, fake.train_images[index]))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_augmentation_parameters_are_deepobs(name):
    steps = {type(step): step for step in deepobs_augmentation(name).transforms}
    pad = steps[v2.Pad]
    assert pad.padding == 2 and pad.fill == 0 and pad.padding_mode == "constant"
    assert tuple(steps[v2.RandomCrop].size) == (32, 32) and steps[v2.RandomCrop].padding is None
    jitter = steps[v2.ColorJitter]
    assert jitter.brightness == pytest.approx((1 - 63 / 255, 1 + 63 / 255))
    assert jitter.contrast == pytest.approx((0.2, 1.8)) and jitter.saturation == pytest.approx((0.5, 1.5))
    assert jitter.hue is None
    assert (v2.RandomHorizontalFlip in steps) == name.startswith("cifar")
    if name.startswith("cifar"):
        assert steps[v2.RandomHorizontalFlip].p == 0.5


def test_no_augmentation_for_mnist(tmp_path):
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST, variant="FashionMNIST")
    splits = load_image_splits("fmnist", tmp_path, download=False, seed=0, valid_size=VALID, augment=True)
    assert deepobs_augmentation("fmnist") is None
    assert splits.train.dataset is splits.valid.dataset


def test_input_scale_multiplies_final_inputs(tmp_path):
    write_fake_cifar100(tmp_path, N_TRAIN, N_TEST)
    plain = load_image_splits("cifar100", tmp_path, download=False, seed=0, valid_size=VALID)
    scaled = load_image_splits("cifar100", tmp_path, download=False, seed=0, valid_size=VALID, input_scale=255.0)
    assert torch.allclose(scaled.test[0][0], plain.test[0][0] * 255)
    assert torch.allclose(scaled.valid[1][0], plain.valid[1][0] * 255)


def test_data_loader_batches_equal_single_items(tmp_path):
    write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    splits = load_image_splits("svhn", tmp_path, download=False, seed=0, valid_size=VALID)
    images, labels = next(iter(DataLoader(splits.valid, batch_size=4, shuffle=False)))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64 and labels.shape == (4,)
    for i in range(4):
        assert torch.equal(images[i], splits.valid[i][0]) and labels[i] == splits.valid[i][1]


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_missing_files_say_where_and_how_to_get_them(tmp_path, name):
    with pytest.raises(CockpitError) as caught:
        load_image_splits(name, tmp_path, download=False, seed=0)
    error = caught.value
    assert str(tmp_path) in error.message and "not found" in error.message
    assert "download: true" in error.hint and "data_dir" in error.hint


def test_missing_file_is_named(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(CockpitError) as caught:
        load_image_splits("cifar10", tmp_path, download=False, seed=0)
    assert caught.value.message.endswith("missing data_batch_4")


def test_failed_download_is_explained(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(CockpitError, match="could not download MNIST") as caught:
        load_image_splits("mnist", tmp_path, download=True, seed=0)
    assert "internet" in caught.value.hint


def test_unpicklable_cifar_batch_is_named(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(CockpitError, match="data_batch_3") as caught:
        load_image_splits("cifar10", tmp_path, download=False, seed=0)
    assert "corrupted" in caught.value.hint


def test_cifar100_without_fine_labels_is_named(tmp_path):
    write_fake_cifar100(tmp_path, N_TRAIN, N_TEST)
    path = tmp_path / "cifar-100-python" / "test"
    entry = pickle.loads(path.read_bytes())
    del entry["fine_labels"]
    path.write_bytes(pickle.dumps(entry))
    with pytest.raises(CockpitError, match="file test in") as caught:
        load_image_splits("cifar100", tmp_path, download=False, seed=0)
    assert caught.value.message.endswith(": ValueError: no 'fine_labels' entry")


def test_truncated_idx_file_is_named(tmp_path):
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CockpitError, match="t10k-images-idx3-ubyte"):
        load_image_splits("mnist", tmp_path, download=False, seed=0)


def test_truncated_svhn_file_is_named(tmp_path):
    write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CockpitError, match="train_32x32.mat"):
        load_image_splits("svhn", tmp_path, download=False, seed=0)


def test_mismatched_counts_and_bad_labels_are_errors(tmp_path):
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST)
    raw = tmp_path / "MNIST" / "raw"
    from fakedata import write_idx

    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(N_TEST - 1, dtype=np.uint8))
    with pytest.raises(CockpitError, match="12 images but 11 labels"):
        load_image_splits("mnist", tmp_path, download=False, seed=0)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(N_TEST, 12, dtype=np.uint8))
    with pytest.raises(CockpitError, match="labels outside 0..9"):
        load_image_splits("mnist", tmp_path, download=False, seed=0)


def test_unknown_dataset_lists_known_ones(tmp_path):
    with pytest.raises(CockpitError) as caught:
        load_image_splits("cifar1O", tmp_path, download=False, seed=0)
    assert "cifar1O" in caught.value.message
    for name in IMAGE_DATASETS:
        assert name in caught.value.hint


def error_of(name: str, data_dir: Path) -> CockpitError:
    """The error that reading data set ``name`` from ``data_dir`` raises."""
    with pytest.raises(CockpitError) as caught:
        load_image_splits(name, data_dir, download=False, seed=0)
    return caught.value


def test_missing_files_are_listed_once_each_with_the_folder_they_belong_in(tmp_path):
    error = error_of("cifar10", tmp_path)
    batches = ", ".join([f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta", "test_batch"])
    assert error.message == f"CIFAR-10 not found in {tmp_path / 'cifar-10-batches-py'}: missing {batches}"
    assert f"to a folder that has cifar-10-batches-py/ with {batches}" in error.hint
    error = error_of("mnist", tmp_path)
    names = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    assert error.message.endswith(f"missing {names}") and f"MNIST/raw/ with {names}" in error.hint
    error = error_of("svhn", tmp_path)
    assert error.message.endswith("missing train_32x32.mat, test_32x32.mat")
    assert error.hint.endswith("to a folder that has train_32x32.mat, test_32x32.mat")


def test_each_file_check_passes_intact_files(tmp_path):
    for name, writer in WRITERS.items():
        writer(tmp_path / name, 5, 3)
        source = SOURCES[name]
        for file in source.files():
            source.check_file(source.folder(tmp_path / name) / file)


def test_cifar_meta_without_its_names_is_named(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({"num_vis": 3072}))
    error = error_of("cifar10", tmp_path)
    assert error.message.startswith("cannot read CIFAR-10 file batches.meta in ")
    assert error.message.endswith(": ValueError: no 'label_names' entry")


def test_cifar_batch_of_the_wrong_width_is_named(tmp_path):
    write_fake_cifar10(tmp_path, N_TRAIN, N_TEST)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["data"] = entry["data"][:, :100]
    path.write_bytes(pickle.dumps(entry))
    error = error_of("cifar10", tmp_path)
    assert error.message.startswith("cannot read CIFAR-10 file test_batch in ")
    assert error.message.endswith("expected 'data' of shape [N, 3072] and N labels, got (12, 100) and 12")


def test_svhn_file_with_images_of_another_layout_is_named(tmp_path):
    import scipy.io

    write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    path = tmp_path / "test_32x32.mat"
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {"X": mat["X"].reshape(32, 32, 3 * N_TEST), "y": mat["y"]})
    error = error_of("svhn", tmp_path)
    assert error.message.startswith("cannot read SVHN file test_32x32.mat in ")
    assert "expected X [32, 32, 3, N] and y [N, 1], got (32, 32, 36) and (12, 1)" in error.message


@pytest.mark.parametrize("name", ["mnist", "svhn"])
def test_images_of_another_size_are_an_error(tmp_path, name):
    """An image size the problem's model does not take would otherwise fail at the first step."""
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST)
    write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    if name == "mnist":
        from fakedata import write_idx

        write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((N_TRAIN, 32, 32), dtype=np.uint8))
        expected = "train-images-idx3-ubyte, train-labels-idx1-ubyte in {}: images of shape [1, 32, 32] where MNIST has [1, 28, 28]"
        folder = tmp_path / "MNIST" / "raw"
    else:
        import scipy.io

        mat = scipy.io.loadmat(tmp_path / "train_32x32.mat")
        scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": mat["X"][:16, :16], "y": mat["y"]})
        expected = "train_32x32.mat in {}: images of shape [3, 16, 16] where SVHN has [3, 32, 32]"
        folder = tmp_path
    error = error_of(name, tmp_path)
    assert error.message.endswith(expected.format(folder))


def test_labels_below_zero_or_at_the_class_count_are_errors(tmp_path):
    import scipy.io

    from fakedata import write_idx

    write_fake_svhn(tmp_path, N_TRAIN, N_TEST)
    mat = scipy.io.loadmat(tmp_path / "test_32x32.mat")
    y = mat["y"].astype(np.int16)
    y[3] = -1
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": mat["X"], "y": y})
    with pytest.raises(CockpitError, match=r"test_32x32.mat in .*: labels outside 0..9"):
        load_image_splits("svhn", tmp_path, download=False, seed=0)
    write_fake_mnist(tmp_path, N_TRAIN, N_TEST)
    labels = np.arange(N_TRAIN, dtype=np.uint8) % 10
    labels[5] = 10
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with pytest.raises(CockpitError, match=r"train-labels-idx1-ubyte in .*: labels outside 0..9"):
        load_image_splits("mnist", tmp_path, download=False, seed=0)


def test_images_must_be_uint8_and_as_many_as_labels():
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="expected uint8 images"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4), labels)
    with pytest.raises(ValueError, match="expected uint8 images"):
        ImageTensorDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), labels)


def test_a_batch_fetched_at_once_is_augmented_like_single_items():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2)
    dataset = ImageTensorDataset(images, torch.tensor([0, 1]), augmentation=lambda image: 255 - image)
    batch = dataset.__getitems__([1, 0])
    assert torch.equal(batch[0][0], (255 - images[1]).float() / 255) and torch.equal(batch[1][0], (255 - images[0]).float() / 255)
    assert [int(label) for _, label in batch] == [1, 0]
