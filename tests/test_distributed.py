"""Data-parallel training on two Gloo processes: exact instruments, equal records, clean failures.

The instrument test runs ``distributed_worker.py`` once alone and once as two processes under
``torch.distributed.run`` (each process holds half of every batch) and compares every tracked
value. The CLI tests run ``cockpit run --nproc 2`` against ``cockpit run`` on the same config,
and stop one process of a running data-parallel run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest


TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
COCKPIT = [sys.executable, "-m", "cockpit_cli"]


def flat(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every number / string / None inside nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flat(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flat(item, f"{path}[{index}]")
    else:
        yield path, value


def assert_same_values(single: dict, parallel: dict, rel: float, skip: tuple[str, ...] = ()) -> int:
    """Assert both hold the same leaves, numbers equal to ``rel`` (histogram counts exactly);
    return how many numbers were compared."""
    left, right = dict(flat(single)), dict(flat(parallel))
    assert left.keys() == right.keys()
    compared = 0
    for path, expected in left.items():
        if any(part in path for part in skip):
            continue
        actual = right[path]
        if isinstance(expected, float) and isinstance(actual, float) and math.isfinite(expected):
            assert actual == pytest.approx(expected, rel=rel, abs=1e-12), path
            compared += 1
        else:
            assert actual == expected, path
            compared += isinstance(expected, int)
    return compared


def run_worker(out: Path, kind: str, optimizer: str, processes: int, fail_at: int | None = None, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(WORKER), str(out), kind, optimizer, *([str(fail_at)] if fail_at is not None else [])]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(WORKER)]
    return subprocess.run(command, cwd=TESTS, env={**ENVIRONMENT, **(environment or {})}, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(("kind", "optimizer"), [("mlp", "sgd"), ("cnn", "sgd"), ("cnn", "adam")])
def test_every_quantity_on_two_processes_equals_one_process(tmp_path: Path, kind: str, optimizer: str) -> None:
    """Float64 models: two processes with half a batch each give every quantity of the whole batch,
    including the per-sample tests, curvature, HessMaxEV, histograms and Alpha."""
    for processes in (1, 2):
        result = run_worker(tmp_path / f"{processes}.json", kind, optimizer, processes)
        assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((tmp_path / "1.json").read_text())
    parallel = json.loads((tmp_path / "2.json").read_text())
    assert single["unavailable"] == parallel["unavailable"] == {}
    assert sorted(single["records"]) == ["0", "1", "2"]
    expected = {"Alpha", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "TICDiag", "HessTrace", "HessMaxEV", "GradHist1d", "GradHist2d", "Activations", "InputStats"}
    assert expected <= set(single["records"]["0"])
    compared = assert_same_values(single["records"], parallel["records"], rel=1e-8)
    assert compared > 200


def test_a_loop_of_the_python_api_on_two_processes_records_the_whole_batch(tmp_path: Path) -> None:
    """``TrackedRun`` in a user's own loop with DistributedDataParallel: process 0 writes the one
    run directory, whose records equal those of one process on the whole batches, also where the
    loss is scaled (a power of two: every value as without)."""
    worker = TESTS / "distributed_api_worker.py"
    for processes, scale in ((2, "1024"), (1, ""), (2, "")):  # the plain run on two processes last, to be run again below
        command = [sys.executable, str(worker), str(tmp_path / f"{processes}{scale}"), *([scale] if scale else [])]
        if processes > 1:
            command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(worker)]
        result = subprocess.run(command, cwd=TESTS, env=ENVIRONMENT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    single, parallel = read_lines(tmp_path / "1" / "steps.jsonl"), read_lines(tmp_path / "2" / "steps.jsonl")
    assert [record["step"] for record in parallel] == [0, 1, 2]
    assert {"Alpha", "NormTest", "HessTrace", "HessMaxEV", "GradHist1d", "CABS", "EarlyStopping"} <= set(parallel[0]["quantities"])
    compared = assert_same_values([r["quantities"] for r in single], [r["quantities"] for r in parallel], rel=1e-8, skip=("Time",))
    assert compared > 100
    scaled = read_lines(tmp_path / "21024" / "steps.jsonl")  # without the curvature diagonals, whose passes are not scaled
    unscaled = [{name: value for name, value in r["quantities"].items() if name not in ("HessTrace", "TICDiag")} for r in parallel]
    assert assert_same_values(unscaled, [r["quantities"] for r in scaled], rel=1e-12, skip=("Time",)) > 100
    assert [r["loss"] for r in parallel] == pytest.approx([r["loss"] for r in single], rel=1e-9)  # the global batch's
    manifest = json.loads((tmp_path / "2" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"] == {"world_size": 2, "backend": "gloo"}
    assert manifest["batch_size"] == 8  # the global batch's
    again = subprocess.run(command, cwd=TESTS, env=ENVIRONMENT, capture_output=True, text=True, timeout=240)  # into the same directory
    assert again.returncode != 0
    assert f"run directory {tmp_path / '2'} already exists" in again.stderr and "process 0 could not create" in again.stderr  # each process says so
    assert read_lines(tmp_path / "2" / "steps.jsonl") == parallel  # nothing lost


def test_a_failing_process_ends_the_others(tmp_path: Path) -> None:
    """Rank 1 raises at step 1: rank 0 does not hang in the next collective, and the launcher fails."""
    started = time.monotonic()
    result = run_worker(tmp_path / "out.json", "mlp", "sgd", 2, fail_at=1)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.monotonic() - started < 120
    assert not (tmp_path / "out.json").exists()


def test_a_process_short_of_memory_for_the_curvature_switches_it_off_in_every_process(tmp_path: Path) -> None:
    """Rank 1 finds no memory for the curvature factor: rank 0 switches the curvature quantities
    off too (else their collectives would not match), says why, and both finish the run."""
    result = run_worker(tmp_path / "out.json", "cnn", "sgd", 2, environment={"SHORT_OF_MEMORY_RANK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads((tmp_path / "out.json").read_text())
    curvature = {"HessTrace", "TICDiag", "TICTrace"}
    assert set(output["unavailable"]) == curvature
    assert all(reason.startswith("the curvature factor does not fit in the memory of another process") for reason in output["unavailable"].values())
    assert all(not curvature & set(values) and "GradNorm" in values for values in output["records"].values())


def test_a_reduction_failing_in_one_process_switches_its_readers_off_in_every_process(tmp_path: Path) -> None:
    """Rank 1's per-sample statistics fail at step 1: rank 0 switches the quantities that read them
    off too, from that step on (their sums would lack a part, and later collectives would not
    match), says why, and both finish the run."""
    result = run_worker(tmp_path / "out.json", "mlp", "sgd", 2, environment={"FAILING_REDUCTION_RANK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads((tmp_path / "out.json").read_text())
    switched_off = {"Alpha", "NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "TICDiag", "TICTrace", "GradHist1d", "GradHist2d", "CABS", "EarlyStopping"}
    assert switched_off <= set(output["unavailable"])
    assert all(reason.startswith("failed at step 1 and was switched off: ") and reason.endswith("a reduction it reads failed in another process") for reason in output["unavailable"].values())
    assert {"NormTest", "Loss", "HessTrace"} <= set(output["records"]["0"])
    assert all(not set(output["unavailable"]) & set(output["records"][step]) and "Loss" in output["records"][step] for step in ("1", "2"))


# --- the command line ----------------------------------------------------------------------------


def cockpit(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*COCKPIT, *arguments], env=ENVIRONMENT, capture_output=True, text=True, timeout=timeout)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def parallel_config(make_config: Any, data_dir: Path) -> Path:
    """Six steps of the MNIST-1D MLP with the full preset and more, evaluated every third step."""
    return make_config(
        problem={"name": "mnist1d_mlp", "batch_size": 16, "data_dir": str(data_dir)},
        training={"steps": 6, "seed": 0, "device": "cpu", "eval_every_steps": 3, "eval_max_batches": 2, "track_samples": 8},
        instruments={"preset": "full", "quantities": {"MeanGSNR": True, "LayerStats": True, "Activations": True, "InputStats": True}},
    )


@pytest.mark.slow
def test_cli_run_on_two_processes_matches_one_process(tmp_path: Path, parallel_config: Path) -> None:
    """`cockpit run --nproc 2` writes the records a single process writes for the same batches."""
    single = cockpit("run", str(parallel_config), "--out", str(tmp_path), "--name", "one", "--no-live")
    assert single.returncode == 0, single.stderr
    parallel = cockpit("run", str(parallel_config), "--nproc", "2", "--out", str(tmp_path), "--name", "two", "--no-live")
    assert parallel.returncode == 0, parallel.stderr
    assert "error" not in parallel.stderr
    assert "(2 processes, gloo)" in parallel.stdout
    manifest = json.loads((tmp_path / "two" / "run.json").read_text())
    assert manifest["status"] == "completed"
    # the command the user typed, not the one the launcher gave its processes
    assert manifest["command"][1:] == ["run", str(parallel_config), "--nproc", "2", "--out", str(tmp_path), "--name", "two", "--no-live"]
    assert manifest["processes"] == {"world_size": 2, "backend": "gloo"}
    assert json.loads((tmp_path / "one" / "run.json").read_text())["processes"] == {"world_size": 1, "backend": None}
    one, two = read_lines(tmp_path / "one" / "steps.jsonl"), read_lines(tmp_path / "two" / "steps.jsonl")
    assert [r["step"] for r in two] == list(range(6))
    assert {"NormTest", "HessMaxEV", "TICDiag", "GradHist2d", "Alpha", "MeanGSNR"} <= set(two[0]["quantities"])
    # float32 sums in another order: equal to rounding; histogram counts may move across a bin edge
    assert_same_values(one, two, rel=2e-3, skip=("time", "Time", "GradHist", "HessMaxEV"))
    for a, b in zip(one, two):
        counts_a, counts_b = a["quantities"]["GradHist1d"]["counts"], b["quantities"]["GradHist1d"]["counts"]
        assert sum(counts_a) == sum(counts_b) and sum(abs(x - y) for x, y in zip(counts_a, counts_b)) <= 0.001 * sum(counts_a)
        assert b["quantities"]["HessMaxEV"] == pytest.approx(a["quantities"]["HessMaxEV"], rel=1e-2)
    evals_one, evals_two = read_lines(tmp_path / "one" / "evals.jsonl"), read_lines(tmp_path / "two" / "evals.jsonl")
    assert [e["step"] for e in evals_two] == [0, 3, 6]
    assert_same_values(evals_one, evals_two, rel=1e-4, skip=("time",))


@pytest.mark.slow
def test_cli_rejects_a_batch_that_does_not_split(tmp_path: Path, parallel_config: Path) -> None:
    result = cockpit("run", str(parallel_config), "--nproc", "3", "--out", str(tmp_path), "--name", "bad", "--no-live")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {parallel_config} with --nproc 3: distributed.nproc: a batch of 16 samples does not split into 3 equal shards"], result.stderr
    assert "Traceback" not in result.stderr


def worker_pids(rank: int, parent: int) -> list[int]:
    """Process ids of ``cockpit_cli`` workers of ``rank`` started under ``parent`` (any depth)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment and b"cockpit_cli" in command and _descends_from(int(entry.name), parent):
            found.append(int(entry.name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker processes through /proc")
def test_cli_a_killed_process_ends_the_run_cleanly(tmp_path: Path, parallel_config: Path) -> None:
    """Rank 1 is killed mid-run: one error line names it, exit code 1, the run directory says
    failed with the steps written so far, and no traceback."""
    launcher = start_parallel_run(parallel_config, tmp_path, "k", "training.steps=100000", "instruments.preset=economy")
    steps = tmp_path / "k" / "steps.jsonl"
    wait_for_steps(launcher, steps, 20)
    (victim,) = worker_pids(1, launcher.pid)
    os.kill(victim, signal.SIGKILL)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, err
    assert "error: process 1 of 2 was killed by SIGKILL" in err
    assert "Traceback" not in err
    manifest = json.loads((tmp_path / "k" / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert "another process of this run stopped" in manifest["message"]
    records = read_lines(steps)
    assert manifest["steps_completed"] == len(records) >= 20
    assert [r["step"] for r in records] == list(range(len(records)))


def start_parallel_run(config: Path, out: Path, name: str, *settings: str) -> subprocess.Popen:
    sets = [argument for setting in settings for argument in ("--set", setting)]
    command = [*COCKPIT, "run", str(config), "--nproc", "2", *sets, "--out", str(out), "--name", name, "--no-live"]
    return subprocess.Popen(command, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(launcher: subprocess.Popen, steps: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while not (steps.exists() and steps.read_text().count("\n") >= count):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)


@pytest.mark.slow
def test_cli_interrupt_then_resume_on_two_processes(tmp_path: Path, parallel_config: Path) -> None:
    """SIGTERM to `cockpit run --nproc 2` closes the run as interrupted (exit 130); --resume
    finishes it on two processes with every step recorded once."""
    launcher = start_parallel_run(parallel_config, tmp_path, "r", "training.steps=300", "training.checkpoint_every=10", "instruments.preset=economy")
    wait_for_steps(launcher, tmp_path / "r" / "steps.jsonl", 20)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err
    assert "interrupted: the run stopped after" in err and "Traceback" not in err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "interrupted"
    resumed = cockpit("run", "--resume", str(tmp_path / "r"), "--no-live")
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"]["world_size"] == 2
    assert [r["step"] for r in read_lines(tmp_path / "r" / "steps.jsonl")] == list(range(300))


@pytest.mark.slow
def test_cli_an_existing_run_directory_is_one_error_line(tmp_path: Path, parallel_config: Path) -> None:
    """Rank 0 refuses to overwrite while the other process has started: one error line, exit 2,
    no traceback from the process left waiting, and the existing run untouched."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run.json").write_text('{"status": "completed"}')
    result = cockpit("run", str(parallel_config), "--nproc", "2", "--out", str(tmp_path), "--name", "taken", "--no-live")
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: run directory {tmp_path / 'taken'} already exists"]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "taken" / "run.json").read_text() == '{"status": "completed"}'


def test_the_launch_environment_and_the_shard_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from cockpit_cli.config import parse_config
    from cockpit_cli.errors import CockpitError
    from cockpit_cli.launch import check_shards, environment_world, process_label

    monkeypatch.setenv("WORLD_SIZE", "")  # set but empty: one process
    assert environment_world() is None and process_label() == ""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert environment_world() == (0, 4, 0) and process_label() == ""  # rank 0 speaks for the run
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert environment_world() == (2, 4, 1) and process_label() == "process 2 of 4: "
    config = parse_config({"problem": {"name": "mnist1d_mlp"}})  # the problem's batch of 100
    check_shards(config, None, 4)
    with pytest.raises(CockpitError, match="a batch of 100 samples does not split into 3 equal shards"):
        check_shards(config, None, 3)


def test_a_process_asked_for_cuda_without_a_gpu_says_so_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend NCCL follows from training.device: cuda; the error names the device the user set."""
    import torch

    from cockpit_cli.config import parse_config
    from cockpit_cli.errors import CockpitError
    from cockpit_cli.training.distributed import start_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    config = parse_config({"problem": {"name": "mnist1d_mlp"}, "training": {"device": "cuda"}})
    with pytest.raises(CockpitError, match="training.device: cuda was asked for but no CUDA GPU is available"):
        start_processes(config)
    config = parse_config({"problem": {"name": "mnist1d_mlp"}, "distributed": {"backend": "nccl"}})
    with pytest.raises(CockpitError, match="distributed.backend: nccl needs CUDA GPUs and none is available"):
        start_processes(config)
