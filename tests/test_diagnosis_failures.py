"""Each config in configs/failures trains briefly, and `diagnose` names its failure first.

The runs go through `cockpit run` on the command line (shortened with --set where the failure
shows early enough); the healthy baselines must get no warning or error.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.diagnosis import diagnose
from cockpit_cli.diagnosis.command import run_diagnose
from cockpit_cli.diagnosis.engine import ENABLED_BY_PRESET, PRESET_ORDER
from cockpit_cli.storage.reader import read_run

CONFIGS = Path(__file__).parents[1] / "configs" / "failures"

# config name: (the expected first finding, or None for a healthy baseline; --set overrides)
CASES: dict[str, tuple[str | None, list[str]]] = {
    "healthy_mlp": (None, ["training.epochs=2"]),
    "healthy_cnn": (None, ["training.epochs=2"]),
    "healthy_quadratic": (None, ["training.epochs=15"]),
    "lr_too_large": ("lr_too_large", ["training.epochs=15"]),
    "lr_too_small": ("lr_too_small", ["training.epochs=15"]),
    "inputs_255": ("misscaled_inputs", ["training.epochs=1"]),
    "deep_sigmoid": ("vanishing_gradients", ["training.epochs=1"]),
    "bad_init_small": ("vanishing_gradients", ["training.epochs=1"]),
    "dead_relu": ("dead_units", ["training.epochs=2"]),
    "tiny_batch": ("gradient_noise", ["training.steps=240"]),
    "overfitting": ("overfitting", ["training.epochs=30"]),
    "frozen_by_schedule": ("frozen_parameters", ["training.steps=80"]),
}

@pytest.mark.slow
@pytest.mark.parametrize("config", list(CASES))
def test_diagnose_names_the_failure_first(config: str, tmp_path: Path, data_dir: Path) -> None:
    expected, overrides = CASES[config]
    args = ["run", str(CONFIGS / f"{config}.yaml"), "--out", str(tmp_path), "--name", config]
    for override in [f"problem.data_dir={data_dir}", "training.device=cpu", "training.log_every=1000", *overrides]:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    console = Console(file=io.StringIO(), width=120, color_system=None)
    code = run_diagnose(tmp_path / config, as_json=False, fail_on="warning", console=console)
    report = console.file.getvalue()
    if expected is None:
        assert code == 0 and "healthy: no warnings" in report, report
    else:
        findings = diagnose(read_run(tmp_path / config)).findings
        assert code == 1 and findings[0].rule == expected, report


@pytest.mark.slow
def test_early_stopping_is_reported_where_tracked(tmp_path: Path, data_dir: Path) -> None:
    overrides = ["optimizer.momentum=0", "optimizer.lr=0.3", "instruments.quantities={EarlyStopping: true}"]  # plain SGD tracks it
    args = ["run", str(CONFIGS / "overfitting.yaml"), "--out", str(tmp_path), "--name", "run"]
    for override in [f"problem.data_dir={data_dir}", "training.device=cpu", *overrides]:
        args += ["--set", override]
    assert CliRunner().invoke(app, args).exit_code == 0
    findings = {finding.rule: finding for finding in diagnose(read_run(tmp_path / "run")).findings}
    assert list(findings)[0] == "overfitting"
    assert findings["early_stopping"].severity == "info"


def test_every_failure_config_is_tested() -> None:
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(CASES)


def test_enable_hints_name_the_smallest_preset_that_tracks_a_quantity() -> None:
    from cockpit_cli.instruments.presets import PRESETS

    for quantity, preset in ENABLED_BY_PRESET.items():
        assert quantity in PRESETS[preset]
        assert all(quantity not in PRESETS[smaller] for smaller in PRESET_ORDER[: PRESET_ORDER.index(preset)])
    tracked = set().union(*PRESETS.values())
    assert tracked == set(ENABLED_BY_PRESET)
