"""Every shipped config is valid: keys, problem, optimizer, schedule and instruments all build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cockpit_cli.config import load_config
from cockpit_cli.instruments.settings import build_quantities
from cockpit_cli.training.build import check_problem_options
from cockpit_cli.training.optim import build_optimizer, build_scheduler

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_builds(path: Path) -> None:
    config = load_config(path)
    check_problem_options(config)
    optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(3))])
    build_scheduler(config, optimizer)
    assert build_quantities(config, total_steps=1000) or config.instruments.preset == "none"


def test_there_is_a_config_per_family_and_failure_configs() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "cifar10", "cifar100", "svhn", "mnist", "vae", "quadratic", "two_d"} <= names
    assert len([p for p in CONFIGS if p.parent.name == "failures"]) >= 8
