"""A corpus of bad inputs: each gets one clear error line, a non-zero exit, no traceback, no debris."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cockpit_cli.cli import app
from conftest import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A small finished run to damage in copies."""
    root = tmp_path_factory.mktemp("finished")
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(data_dir, root / "results", training={"steps": 4})))
    assert runner.invoke(app, ["run", str(path), "--no-live"], catch_exceptions=False).exit_code == 0
    return root / "results" / "run"


def config_case(sections: dict, message: str, extra: tuple[str, ...] = ()) -> tuple:
    return ("config", sections, extra, message)


CONFIG_CASES = [
    config_case({"problm": {}}, "problm: unknown key; did you mean 'problem'?"),
    config_case({"training": {"epoch": 2}}, "training.epoch: unknown key; did you mean 'epochs'?"),
    config_case({"problem": {"batch_size": "big"}}, "problem.batch_size: expected an integer or null, got 'big'"),
    config_case({"problem": {"batch_size": -4}}, "problem.batch_size: expected a value >= 1, got -4"),
    config_case({"training": {"steps": 0}}, "training.steps: expected a value >= 1, got 0"),
    config_case({"training": {"seed": True}}, "training.seed: expected an integer, got True"),
    config_case({"problem": {"name": "mnist_mpl"}}, "problem.name: problem 'mnist_mpl' is unknown; did you mean 'mnist_mlp'?"),
    config_case({"problem": {"colour": "red"}}, "problem.colour: unknown key for problem 'mnist1d_mlp'"),
    config_case({"problem": {"options": {"depth": 3}}}, "problem.options: unknown key for problem 'mnist1d_mlp'"),  # options go straight under problem:
    config_case({"problem": {"depth": "deep"}}, "problem.depth: expected an integer, got 'deep'"),
    config_case({"problem": {"depth": 0}}, "option depth=0 is invalid"),
    config_case({"optimizer": {"name": "Adamm"}}, "optimizer.name: optimizer 'Adamm' is not in torch.optim; did you mean 'Adam'?"),
    config_case({"optimizer": {"name": "SGD", "lr": 0.1, "momentun": 0.9}}, "optimizer.momentun: SGD has no argument 'momentun'; did you mean 'momentum'?"),
    config_case({"optimizer": {"name": "SGD", "lr": [1]}}, "optimizer.lr: expected a number, got list"),
    config_case({"optimizer": {"name": "SGD", "lr": -1}}, "torch.optim.SGD rejected the arguments: Invalid learning rate: -1"),
    config_case({"optimizer": {"name": "LBFGS", "lr": 1}}, "optimizer.name: LBFGS needs a closure that evaluates the loss again within each step, which the training loop does not take"),
    config_case({"optimizer": {"name": "SparseAdam", "lr": 0.01}}, "optimizer.name: SparseAdam takes sparse gradients only, which the problems' layers do not give"),
    config_case({"schedule": {"name": "StepLRR", "step_size": 2}}, "schedule.name: scheduler 'StepLRR' is not in torch.optim.lr_scheduler; did you mean 'StepLR'?"),
    config_case({"schedule": {"name": "StepLR"}}, "schedule.step_size: StepLR needs argument 'step_size'"),
    config_case({"schedule": {"name": "StepLR", "step_size": 2, "gama": 0.5}}, "schedule.gama: StepLR has no argument 'gama'; did you mean 'gamma'?"),
    config_case({"schedule": {"name": "StepLR", "step_size": 2, "interval": "batch"}}, "schedule.interval: expected one of 'step', 'epoch', got 'batch'"),
    config_case({"schedule": {"name": "ReduceLROnPlateau"}}, "schedule.name: ReduceLROnPlateau needs Python objects or a metric and cannot be configured from YAML"),
    config_case({"schedule": {"name": "SequentialLR", "milestones": [3]}}, "schedule.name: SequentialLR needs Python objects or a metric and cannot be configured from YAML"),
    config_case({"schedule": {"name": "StepLR", "step_size": 2, "last_epoch": 3}}, "schedule.last_epoch: StepLR has no argument 'last_epoch'"),
    config_case({"schedule": {"name": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 0}}, "schedule: torch.optim.lr_scheduler.CyclicLR rejected the arguments: float division by zero"),
    config_case({"schedule": {"name": "StepLR", "step_size": 0, "interval": "step"}}, "schedule: torch.optim.lr_scheduler.StepLR fails at its step 1: integer modulo by zero"),
    config_case({"schedule": {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 10, "interval": "step"}}, "schedule: torch.optim.lr_scheduler.OneCycleLR fails at its step 11: Tried to step 11 times"),
    config_case({"schedule": {"name": "CosineAnnealingLR", "T_max": 4, "eta_min": -0.1, "interval": "step"}}, "schedule: torch.optim.lr_scheduler.CosineAnnealingLR sets the learning rate to -"),
    config_case({"optimizer": {"name": "Adam", "betas": [0.9, "high"]}}, "optimizer: torch.optim.Adam rejected the arguments: '<=' not supported"),
    config_case({"instruments": {"quantities": {"NormTset": True}}}, "instruments.quantities.NormTset: quantity 'NormTset' is unknown; did you mean 'NormTest'?"),
    config_case({"instruments": {"quantities": {"GradHist1d": {"binz": 3}}}}, "instruments.quantities.GradHist1d.binz: GradHist1d has no setting 'binz'; did you mean 'bins'?"),
    config_case({"instruments": {"quantities": {"GradHist1d": {"bins": "many"}}}}, "instruments.quantities.GradHist1d.bins: expected an integer, got 'many'"),
    config_case({"instruments": {"quantities": {"GradHist1d": {"bins": 10**10}}}}, "instruments.quantities.GradHist1d.bins: expected a value <= 10000, got 10000000000"),
    config_case({"instruments": {"quantities": {"GradHist2d": {"bins": [40, 1001]}}}}, "instruments.quantities.GradHist2d.bins: expected a value <= 1000, got 1001"),
    config_case({"instruments": {"quantities": {"GradHist2d": {"bins": [0, 50]}}}}, "instruments.quantities.GradHist2d.bins: expected a value >= 1, got 0"),
    config_case({"instruments": {"quantities": {"HessMaxEV": {"rtol": -0.1}}}}, "instruments.quantities.HessMaxEV.rtol: expected a value >= 0, got -0.1"),
    config_case({"instruments": {"quantities": {"GradHist1d": {"range": [2, -2]}}}}, "instruments.quantities.GradHist1d.range: expected a range [low, high] of finite numbers with low < high, got [2, -2]"),
    config_case({"instruments": {"quantities": {"GradHist2d": {"range": [[-1, 1], [0.5, 0.5]]}}}}, "instruments.quantities.GradHist2d.range: expected a range [low, high] of finite numbers with low < high, got [0.5, 0.5]"),
    config_case({"instruments": {"preset": "luxury"}}, "instruments.preset: expected one of 'none', 'economy', 'business', 'full', got 'luxury'"),
    config_case({"instruments": {"curvature": "fisher"}}, "instruments.curvature: expected one of 'hessian', 'ggn', 'ggn_mc', got 'fisher'"),
    config_case({"training": {"device": "tpu"}}, "training.device: expected one of 'auto', 'cpu', 'cuda', got 'tpu'"),
    config_case({"training": {"steps": 3, "epochs": 2}}, "training: give either epochs or steps, not both"),
    config_case({"training": {"on_nonfinite": "ignore"}}, "training.on_nonfinite: expected one of 'stop', 'skip', 'continue', got 'ignore'"),
    config_case({"problem": {"batch_size": 100_000}}, "problem.batch_size: batch size 100000 is larger than the 6400 training examples"),
    config_case({"output": {"name": "../escape"}}, "output.name: '../escape' is not a safe directory name"),
    config_case({"problem": {"name": "cifar10_3c3d", "data_dir": "__DATA__/empty"}}, "CIFAR-10 not found in"),
    config_case({"distributed": {"nproc": 0}}, "distributed.nproc: expected a value >= 1, got 0"),
    config_case({"distributed": {"backend": "mpi"}}, "distributed.backend: expected one of 'auto', 'gloo', 'nccl', got 'mpi'"),
    config_case({"distributed": {"backend": "nccl"}, "training": {"device": "cpu"}}, "distributed.backend: nccl needs CUDA GPUs, but training.device is cpu"),
    config_case({"distributed": {"nproc": 5}}, "distributed.nproc: a batch of 32 samples does not split into 5 equal shards"),
    config_case({}, "--set 'optimizer.lr': expected key.path=value", ("--set", "optimizer.lr")),
    config_case({}, "--set 'a..b=1': 'a..b' is not a key path", ("--set", "a..b=1")),
    config_case({}, "--set 'optimizer.lr.x=1': optimizer.lr is not a section", ("--set", "optimizer.lr.x=1")),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(config_case({"training": {"device": "cuda"}}, "training.device: cuda was asked for but no CUDA GPU is available"))


@pytest.mark.parametrize(("kind", "sections", "extra", "message"), CONFIG_CASES, ids=[f"config{i}" for i in range(len(CONFIG_CASES))])
def test_bad_configs(tmp_path: Path, data_dir: Path, kind: str, sections: dict, extra: tuple, message: str) -> None:
    config = tiny_config(data_dir, tmp_path / "results")
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    text = yaml.safe_dump(config).replace("__DATA__", str(tmp_path))
    (tmp_path / "empty").mkdir()
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["run", str(path), "--no-live", *extra], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())  # nothing half-written


def damaged(finished_run: Path, tmp_path: Path, damage) -> Path:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(finished_run, copy)
    damage(copy)
    return copy


RUN_CASES = [
    (["diagnose"], lambda d: (d / "run.json").write_text("{broken"), "is corrupted: its manifest is not valid JSON"),
    (["diagnose"], lambda d: (d / "run.json").unlink(), "is not a run directory: it has no run.json"),
    (["diagnose"], lambda d: (d / "run.json").write_text(json.dumps({"schema_version": 9})), "newer than this cockpit understands"),
    (["diagnose"], lambda d: (d / "run.json").write_text("[]"), "is corrupted: expected a JSON object"),
    (["diagnose"], lambda d: (d / "steps.jsonl").write_text('{"step": 0}\ngarbage\n{"step": 2}\n'), "steps.jsonl is corrupted at line 2"),
    (["diagnose"], lambda d: (d / "summary.json").write_text("{"), "is corrupted: its summary is not valid JSON"),
    (["report"], lambda d: (d / "run.json").unlink(), "is not a run directory: it has no run.json"),
    (["watch", "--no-follow"], lambda d: (d / "run.json").write_text("{broken"), "is corrupted: its manifest is not valid JSON"),
    (["run", "--resume"], lambda d: None, "completed its 4 steps; there is nothing to resume"),
    (["run", "--resume"], lambda d: interrupted(d), "has no checkpoint to resume from"),
    (["run", "--resume"], lambda d: (interrupted(d), (d / "checkpoint.pt").write_bytes(b"junk")), "cannot be read"),
]


def interrupted(run_dir: Path) -> None:
    """Mark the run as interrupted, as Ctrl-C leaves it."""
    manifest = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**manifest, "status": "interrupted"}))


@pytest.mark.parametrize(("command", "damage", "message"), RUN_CASES, ids=[f"run{i}" for i in range(len(RUN_CASES))])
def test_damaged_run_directories(finished_run: Path, tmp_path: Path, command: list[str], damage, message: str) -> None:
    run_dir = damaged(finished_run, tmp_path, damage)
    result = runner.invoke(app, [*command, str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


PATH_CASES = [
    (["diagnose", "{missing}"], "does not exist"),
    (["diagnose", "{file}"], "is a file, not a run directory"),
    (["diagnose", "{empty}"], "is not a run directory: it has no run.json"),
    (["report", "{run}", "--step-range", "9:2"], "the start (9) must be smaller than the end (2)"),
    (["report", "{run}", "--step-range", "x"], "step range 'x'"),
    (["compare", "{run}"], "compare needs at least two runs"),
    (["compare", "{run}", "{empty}"], "is not a run directory and holds none"),
    (["diagnose", "{run}", "--fail-on", "fatal"], "fatal"),
    (["run", "{missing}"], "does not exist"),
    (["run", "{empty}"], "is a directory, not a YAML file"),
    (["run", "{file}"], "expected a mapping with sections"),
    (["run"], "needs a CONFIG file"),
]


@pytest.mark.parametrize(("arguments", "message"), PATH_CASES, ids=[f"path{i}" for i in range(len(PATH_CASES))])
def test_bad_paths_and_arguments(finished_run: Path, tmp_path: Path, arguments: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("just text\n")
    names = {"missing": tmp_path / "missing", "file": tmp_path / "file", "empty": tmp_path / "empty", "run": finished_run}
    result = runner.invoke(app, [a.format(**names) for a in arguments], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_existing_run_and_output_under_a_file(finished_run: Path, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(data_dir, finished_run.parent, training={"steps": 2})))
    result = runner.invoke(app, ["run", str(path), "--no-live"], catch_exceptions=False)
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["run", str(path), "--no-live", "--out", str(tmp_path / "afile" / "sub")], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot create output directory" in result.output


def test_the_corpus_has_at_least_forty_inputs() -> None:
    assert len(CONFIG_CASES) + len(RUN_CASES) + len(PATH_CASES) + 2 >= 40
