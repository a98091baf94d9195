"""Shared tiny fixtures: a cached MNIST-1D data directory and small run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory shared by the whole session (MNIST-1D is generated once into it)."""
    return tmp_path_factory.mktemp("data")


def tiny_config(data_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Return a config mapping for a few fast MNIST-1D steps; ``sections`` update its sections."""
    config: dict[str, Any] = {
        "problem": {"name": "mnist1d_mlp", "batch_size": 32, "data_dir": str(data_dir)},
        "optimizer": {"name": "SGD", "lr": 0.1},
        "training": {"steps": 12, "seed": 0, "device": "cpu", "eval_every_steps": 5, "eval_max_batches": 2, "log_every": 5},
        "instruments": {"preset": "none"},
        "output": {"directory": str(out_dir), "name": "run", "figures": False},
    }
    for section, values in sections.items():
        if values is None:
            config[section] = None
        else:
            config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path, data_dir: Path):
    """Factory fixture: ``make_config(**sections) -> Path`` of a tiny YAML config in tmp_path."""

    def make(name: str = "config.yaml", **sections: dict[str, Any]) -> Path:
        return write_config(tmp_path / name, tiny_config(data_dir, tmp_path / "results", **sections))

    return make
