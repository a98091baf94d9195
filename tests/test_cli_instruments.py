"""`cockpit run` with instruments: every quantity lands in the run directory at its scheduled steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from cockpit_cli.cli import app
from cockpit_cli.instruments import curvature_memory
from cockpit_cli.instruments.presets import PRESETS
from cockpit_cli.storage.reader import read_run

runner = CliRunner()


def test_full_preset_writes_every_quantity_on_schedule(make_config, tmp_path: Path) -> None:
    config = make_config(
        instruments={"preset": "full", "every": 2, "quantities": {"HessMaxEV": {"every": 3}, "MeanGSNR": True, "TICTrace": {"every": 4}}},
        training={"steps": 7, "eval_every_steps": 7},
    )
    result = runner.invoke(app, ["run", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = read_run(tmp_path / "results" / "run")
    tracked = set(PRESETS["full"]) - {"HessMaxEV"}
    for record in run.steps:
        step, names = record["step"], set(record["quantities"])
        expected = set()
        if step % 2 == 0:
            expected |= tracked | {"MeanGSNR"}
        if step % 3 == 0:
            expected.add("HessMaxEV")
        if step % 4 == 0:
            expected.add("TICTrace")
        if step == 6:
            expected.discard("Alpha")  # Alpha of the last step needs a step that never comes
        assert names == expected, (step, names ^ expected)
    quantities = run.steps[0]["quantities"]
    parameters = run.manifest["instruments"]["parameters"]
    assert len(quantities["GradNorm"]) == len(parameters) == len(quantities["HessTrace"])
    elements = sum(math.prod(shape) for shape in run.manifest["instruments"]["shapes"])
    assert sum(quantities["GradHist1d"]["counts"]) == 32 * elements  # batch 32, every element counted once
    assert isinstance(quantities["Alpha"], float) and quantities["Alpha"] >= -1.0
    assert run.manifest["instruments"]["quantities"]["HessMaxEV"] == "every 3 steps from 0"
    assert run.manifest["instruments"]["unavailable"] == {}


def test_optimizer_specific_quantities_are_skipped_with_a_reason(make_config, tmp_path: Path) -> None:
    config = make_config(optimizer={"name": "Adam", "lr": 0.001}, instruments={"preset": "economy", "quantities": {"CABS": True, "EarlyStopping": True}})
    result = runner.invoke(app, ["run", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = read_run(tmp_path / "results" / "run")
    unavailable = run.manifest["instruments"]["unavailable"]
    assert set(unavailable) == {"CABS", "EarlyStopping"} and "plain SGD only" in unavailable["CABS"]
    assert "Alpha" in run.steps[0]["quantities"] and "CABS" not in run.steps[0]["quantities"]
    notice = "CABS, EarlyStopping not tracked: defined for plain SGD only (no momentum, weight decay or Nesterov); this run uses Adam"
    assert f"note: {notice}" in result.output.replace("\n", " ")  # said at the start, not only in the manifest
    dry = runner.invoke(app, ["run", str(config), "--dry-run"], catch_exceptions=False)
    assert "not tracked: CABS, EarlyStopping: defined for plain SGD only" in dry.output.replace("\n", " ")


def test_unknown_quantity_is_a_clear_error(make_config) -> None:
    result = runner.invoke(app, ["run", str(make_config()), "--set", "instruments.quantities.NormTset=true"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "instruments.quantities.NormTset: quantity 'NormTset' is unknown; did you mean 'NormTest'?" in result.output


def test_quantities_command_lists_every_quantity() -> None:
    result = runner.invoke(app, ["quantities"], catch_exceptions=False)
    assert result.exit_code == 0
    for name in ("Alpha", "HessMaxEV", "TICDiag", "GradHist2d", "LayerStats"):
        assert name in result.output
    rows = {cells[0]: cells[1:3] for cells in ([cell.strip() for cell in line.strip("│").split("│")] for line in result.output.splitlines() if line.startswith("│")) if cells[0]}
    assert rows["Alpha"] == ["per-sample", "economy+"] and rows["HessTrace"] == ["curvature", "business+"]
    assert rows["HessMaxEV"][1] == "full" and rows["CABS"] == ["per-sample, plain SGD", "-"]
    assert "economy+: economy, business and full" in result.output
    listed = json.loads(runner.invoke(app, ["quantities", "--json"], catch_exceptions=False).output)["quantities"]
    assert {row["name"]: row["presets"] for row in listed}["TICDiag"] == ["business", "full"]


def test_curvature_too_large_for_the_memory_is_switched_off_and_said_when_it_happens(make_config, tmp_path: Path, monkeypatch) -> None:
    """The run goes on without HessTrace and TICDiag; the warning is printed when it arises (not
    only at the end) and is in the manifest, with the estimate and the way out."""
    monkeypatch.setattr(curvature_memory, "available_bytes", lambda device: 4096)
    config = make_config(instruments={"preset": "business", "every": 2}, training={"steps": 5, "eval_every_steps": 5})
    result = runner.invoke(app, ["run", str(config), "--no-live"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: TICDiag, HessTrace switched off: the curvature diagonal (hessian) would need about")]
    assert len(warned) == 1 and "ggn_mc" in lines[warned[0]]
    assert warned[0] < next(i for i, line in enumerate(lines) if line.startswith("eval after step 5"))  # said when it happened
    run = read_run(tmp_path / "results" / "run")
    assert [w.split(":")[0] for w in run.manifest["warnings"]] == ["TICDiag, HessTrace switched off"]
    assert all("GradNorm" in r["quantities"] and "HessTrace" not in r["quantities"] for r in run.steps if r["step"] % 2 == 0)
    unavailable = run.manifest["instruments"]["unavailable"]  # the end's description: figures and reports say why
    assert set(unavailable) == {"TICDiag", "HessTrace"} and unavailable["HessTrace"].startswith("the curvature diagonal (hessian) would need about")
