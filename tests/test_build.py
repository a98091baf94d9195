"""Building a run from a config: problem options, optimizer and scheduler arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cockpit_cli.config import parse_config
from cockpit_cli.errors import CockpitError
from cockpit_cli.training.build import build_run
from conftest import tiny_config


def build(data_dir: Path, tmp_path: Path, **sections):
    return build_run(parse_config(tiny_config(data_dir, tmp_path, **sections), source="c.yaml"))


def test_builds_problem_optimizer_and_scheduler(data_dir: Path, tmp_path: Path) -> None:
    setup = build(data_dir, tmp_path, optimizer={"name": "Adam", "lr": 0.01, "betas": [0.8, 0.9]}, schedule={"name": "StepLR", "step_size": 2, "gamma": 0.5})
    assert isinstance(setup.optimizer, torch.optim.Adam)
    assert setup.optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert isinstance(setup.scheduler, torch.optim.lr_scheduler.StepLR)
    assert setup.total_steps == 12
    assert setup.steps_per_epoch == len(setup.problem.splits.train) // 32


def test_epochs_default_to_the_problem_default(data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(data_dir, tmp_path)
    del config["training"]["steps"]
    setup = build_run(parse_config(config))
    assert setup.total_steps == setup.steps_per_epoch * 20  # mnist1d_mlp's default epochs


def test_same_seed_same_initial_weights(data_dir: Path, tmp_path: Path) -> None:
    first = build(data_dir, tmp_path).problem.model
    second = build(data_dir, tmp_path).problem.model
    other = build(data_dir, tmp_path, training={"seed": 1}).problem.model
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_batch_size_defaults_to_the_problem_default(data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(data_dir, tmp_path)
    del config["problem"]["batch_size"]
    setup = build_run(parse_config(config))
    assert setup.batch_size == 100 and setup.steps_per_epoch == 64  # mnist1d_mlp: batch 100, 6400 training examples


def test_the_seed_seeds_numpy_too(data_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    draws = []
    for seed in (3, 3, 4):
        build(data_dir, tmp_path, training={"seed": seed})
        draws.append(np.random.random())
    assert draws[0] == draws[1] != draws[2]


def test_the_optimizer_holds_the_trainable_parameters_only(data_dir: Path, tmp_path: Path) -> None:
    setup = build(data_dir, tmp_path, problem={"name": "quadratic_deep", "batch_size": 32})  # frozen weights, trainable theta
    (group,) = setup.optimizer.param_groups
    assert len(group["params"]) == 1 and group["params"][0] is setup.problem.model.theta


BAD_BUILDS = [
    ({"problem": {"name": "mnist1d_mpl"}}, "c.yaml: problem.name: problem 'mnist1d_mpl' is unknown; did you mean 'mnist1d_mlp'?"),
    ({"problem": {"widht": 3}}, "c.yaml: problem.widht: unknown key for problem 'mnist1d_mlp'; did you mean 'width'?"),
    ({"problem": {"width": "wide"}}, "c.yaml: problem.width: expected an integer, got 'wide'"),
    ({"problem": {"activation": "relux"}}, "c.yaml: problem.activation: expected one of 'relu', 'sigmoid', 'tanh', 'leaky_relu', got 'relux'; did you mean 'relu'?"),
    ({"problem": {"batch_size": 100000}}, "c.yaml: problem.batch_size: batch size 100000 is larger than the 6400 training examples"),
    ({"optimizer": {"name": "Adamm"}}, "c.yaml: optimizer.name: optimizer 'Adamm' is not in torch.optim; did you mean 'Adam'?"),
    ({"optimizer": {"name": "SGD", "lr": 0.1, "momentun": 0.9}}, "c.yaml: optimizer.momentun: SGD has no argument 'momentun'; did you mean 'momentum'?"),
    ({"optimizer": {"name": "SGD", "lr": "fast"}}, "c.yaml: optimizer.lr: expected a number, got 'fast'"),
    ({"optimizer": {"name": "SGD", "lr": -1.0}}, "c.yaml: optimizer: torch.optim.SGD rejected the arguments: Invalid learning rate: -1.0"),
    ({"optimizer": {"name": "SGD", "lr": 0.1, "nesterov": "yes"}}, "c.yaml: optimizer.nesterov: expected true or false, got 'yes'"),
    ({"optimizer": {"name": "Adam", "betas": 0.9}}, "c.yaml: optimizer.betas: expected a list, got 0.9"),
    ({"schedule": {"name": "StepLRR", "step_size": 3}}, "c.yaml: schedule.name: scheduler 'StepLRR' is not in torch.optim.lr_scheduler; did you mean 'StepLR'?"),
    ({"schedule": {"name": "StepLR"}}, "c.yaml: schedule.step_size: StepLR needs argument 'step_size'"),
    ({"schedule": {"name": "StepLR", "step_size": 3, "gama": 0.1}}, "c.yaml: schedule.gama: StepLR has no argument 'gama'; did you mean 'gamma'?"),
    ({"schedule": {"name": "ReduceLROnPlateau"}}, "c.yaml: schedule.name: ReduceLROnPlateau needs Python objects or a metric and cannot be configured from YAML"),
]


@pytest.mark.parametrize(("sections", "message"), BAD_BUILDS, ids=[str(i) for i in range(len(BAD_BUILDS))])
def test_bad_builds_are_rejected_with_one_line(data_dir: Path, tmp_path: Path, sections: dict, message: str) -> None:
    with pytest.raises(CockpitError) as caught:
        build(data_dir, tmp_path, **sections)
    assert caught.value.message == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CockpitError, match="training.device: cuda was asked for but no CUDA GPU is available"):
        build(data_dir, tmp_path, training={"device": "cuda"})


def test_problem_without_default_epochs_needs_them(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from problems import PROBLEMS

    entry = PROBLEMS["mnist1d_mlp"]
    monkeypatch.setitem(PROBLEMS, "mnist1d_mlp", dataclasses.replace(entry, info=dataclasses.replace(entry.info, epochs=None)))
    config = tiny_config(data_dir, tmp_path)
    del config["training"]["steps"]
    with pytest.raises(CockpitError, match="training.epochs: problem 'mnist1d_mlp' has no default number of epochs"):
        build_run(parse_config(config, source="c.yaml"))


def test_an_argument_of_the_files_optimizer_left_over_by_a_changed_name_says_to_set_the_whole_section(data_dir: Path, tmp_path: Path) -> None:
    from cockpit_cli.overrides import apply_overrides

    data = tiny_config(data_dir, tmp_path, optimizer={"name": "SGD", "lr": 0.1, "momentum": 0.9})
    for overrides, whole_section in ((["optimizer.name=Adam"], True), (["optimizer.name=Adam", "optimizer.momentum=0.5"], False)):
        config = parse_config(apply_overrides(data, overrides), source="c.yaml", overrides=overrides)
        with pytest.raises(CockpitError) as caught:
            build_run(config)
        assert "Adam has no argument 'momentum'" in caught.value.message
        assert ("--set 'optimizer={name: Adam, ...}'" in caught.value.hint) == whole_section
        assert caught.value.hint.endswith("its arguments: amsgrad, betas, capturable, decoupled_weight_decay, differentiable, eps, foreach, fused, lr, maximize, weight_decay")
        assert ("leave it out with --set optimizer.momentum=null" in caught.value.hint) == whole_section
    overrides = ["optimizer.name=Adam", "optimizer.momentum=null"]  # a null argument is left out
    setup = build_run(parse_config(apply_overrides(data, overrides), source="c.yaml", overrides=overrides))
    assert type(setup.optimizer).__name__ == "Adam" and "momentum" not in setup.optimizer.defaults
    overrides = ["optimizer.momentum=null"]  # one the class takes: its default
    assert build_run(parse_config(apply_overrides(data, overrides), source="c.yaml", overrides=overrides)).optimizer.defaults["momentum"] == 0
    overrides = ["schedule={name: StepLR, step_size: null}"]  # a required one: said as missing
    with pytest.raises(CockpitError, match="StepLR needs argument 'step_size'"):
        build_run(parse_config(apply_overrides(data, overrides), source="c.yaml", overrides=overrides))


def test_the_dry_run_describes_the_optimizer_by_its_hyperparameters_and_the_quantities_by_schedule(data_dir: Path, tmp_path: Path) -> None:
    from cockpit_cli.training.build import describe_setup

    instruments = {"preset": "economy", "every": 4, "quantities": {"HessMaxEV": {"every": 8}, "Loss": {"every": 1}}}
    facts = describe_setup(build(data_dir, tmp_path, optimizer={"name": "SGD", "lr": 0.05, "momentum": 0.9}, instruments=instruments, schedule={"name": "StepLR", "step_size": 4}))
    assert facts["optimizer"] == "SGD(lr=0.05, momentum=0.9, dampening=0, weight_decay=0, nesterov=False, maximize=False)"
    schedules = dict(part.split(": ") for part in facts["quantities"].split("; "))
    assert schedules["every step from 0"] == "Loss" and schedules["every 8 steps from 0"] == "HessMaxEV"
    assert schedules["every 4 steps from 0"].startswith("Alpha, Distance, GradHist1d, GradNorm")
    assert describe_setup(build(data_dir, tmp_path))["quantities"] == "none"
    cycling = {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 12, "interval": "step"}  # adds max_lr, base_momentum, ... to the group
    assert describe_setup(build(data_dir, tmp_path, optimizer={"name": "SGD", "lr": 0.05, "momentum": 0.9}, schedule=cycling))["optimizer"] == "SGD(lr=0.02, momentum=0.95, dampening=0, weight_decay=0, nesterov=False, maximize=False)"
