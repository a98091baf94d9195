"""Wall-clock time of ``cockpit diagnose`` on a synthetic run of 10,000 tracked steps.

Builds an in-memory run like one the economy preset writes when it tracks every step of an
8-parameter network (Alpha, GradNorm, Distance, UpdateSize, the gradient tests, a 100-bin
gradient histogram with per-parameter histograms, LayerStats, Activations, InputStats), runs
every diagnosis rule over it and reports the time. It also feeds the records one by one to
:class:`LiveDiagnosis` (as during training) and reports the time per check. With ``--disk`` it
also writes the run directory and times reading it (``read_run``) plus diagnosing, as
``cockpit diagnose`` does.

The diagnosis itself must stay under ``--bound`` seconds (default 1): the script exits with
status 1 when the best of ``--repeats`` runs is slower. Run it by hand:

    python benchmarks/diagnose_speed.py --steps 10000 --disk
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cockpit_cli.diagnosis import LiveDiagnosis, diagnose
from cockpit_cli.storage.reader import RunData, read_run

PARAMETERS = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias", "8.weight", "8.bias"]
LAYERS = ["1", "2", "3", "4", "5", "6", "8"]


def _histogram(rng: random.Random, bins: int = 100) -> list[int]:
    return [int(1e5 * math.exp(-abs(i - bins / 2) / 2) * (0.9 + 0.2 * rng.random())) for i in range(bins)]


def step_record(step: int, total: int, rng: random.Random) -> dict[str, Any]:
    """One healthy-looking step record with every economy quantity."""
    width = len(PARAMETERS)
    grad = [0.5 + 0.2 * rng.random() for _ in range(width)]
    quantities = {
        "Alpha": rng.gauss(0.15, 0.3),
        "GradNorm": grad,
        "Distance": [0.01 * step ** 0.5 for _ in range(width)],
        "UpdateSize": [0.05 * g for g in grad],
        "NormTest": 0.8 + 0.1 * rng.random(),
        "InnerTest": 0.2 + 0.05 * rng.random(),
        "OrthoTest": 0.7 + 0.1 * rng.random(),
        "Loss": 2.3 * math.exp(-3 * step / total) + 0.3,
        "GradHist1d": {"counts": _histogram(rng), "range": [-2.0, 2.0], "per_parameter": [_histogram(rng) for _ in range(width)]},
        "LayerStats": {
            "weight_norm": [3.0] * width,
            "grad_norm": grad,
            "update_ratio": [0.015] * width,
            "zero_grad_fraction": [0.02 * rng.random() for _ in range(width)],
        },
        "Activations": {layer: {"mean": 0.1, "std": 0.5, "zero_fraction": 0.5 * (i % 2)} for i, layer in enumerate(LAYERS)},
        "InputStats": {"mean": 0.0, "std": 1.0, "min": -3.9, "max": 3.9},
    }
    loss = quantities["Loss"] + 0.05 * rng.random()
    return {"step": step, "epoch": step // 64, "loss": loss, "lr": [0.1], "time": 0.1 * step, "quantities": quantities}


def synthetic_run(steps: int, seed: int = 0) -> RunData:
    """An in-memory completed run of ``steps`` tracked steps with an evaluation every 64 steps."""
    rng = random.Random(seed)
    records = [step_record(step, steps, rng) for step in range(steps)]
    evals = [
        {"step": step, "epoch": step // 64, "time": 0.1 * step, "splits": {
            split: {"loss": 2.3 * math.exp(-3 * step / steps) + 0.3, "accuracy": 0.9 - 0.8 * math.exp(-3 * step / steps), "examples": 1600}
            for split in ("train_eval", "valid", "test")}}
        for step in range(0, steps + 1, 64)
    ]
    manifest = {
        "schema_version": 1, "status": "completed", "problem": "mnist1d_cnn", "optimizer": "SGD", "batch_size": 100,
        "instruments": {"parameters": PARAMETERS, "quantities": {}, "unavailable": {}},
    }
    config = {"optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9}}
    return RunData(path=Path("synthetic"), manifest=manifest, config=config, steps=records, evals=evals, summary=None)


def write_run(run: RunData, directory: Path) -> Path:
    """Write ``run`` as a run directory (manifest, config, steps, evals) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps(run.manifest))
    (directory / "config.yaml").write_text(json.dumps(run.config))
    (directory / "steps.jsonl").write_text("".join(json.dumps(record) + "\n" for record in run.steps))
    (directory / "evals.jsonl").write_text("".join(json.dumps(record) + "\n" for record in run.evals))
    return directory


class CountingLive(LiveDiagnosis):
    """Live diagnosis that counts its checks."""

    checks = 0

    def check(self) -> list[Any]:
        self.checks += 1
        return super().check()


def timed(function: Any, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="tracked steps of the synthetic run")
    parser.add_argument("--repeats", type=int, default=5, help="timed diagnoses")
    parser.add_argument("--bound", type=float, default=1.0, help="seconds the best diagnosis must stay under")
    parser.add_argument("--check-every", type=int, default=25, help="steps between live checks")
    parser.add_argument("--disk", action="store_true", help="also time reading the run directory from disk")
    args = parser.parse_args()

    run = synthetic_run(args.steps)
    cpu = time.process_time()
    times = timed(lambda: diagnose(run), args.repeats)
    cpu = (time.process_time() - cpu) / args.repeats
    findings = [finding.rule for finding in diagnose(run).findings]
    print(
        f"diagnose, {args.steps} tracked steps in memory: best {min(times):.3f}s, median {statistics.median(times):.3f}s "
        f"wall-clock, {cpu:.3f}s CPU on average (bound {args.bound}s)"
    )
    print(f"findings on the synthetic healthy run: {findings or 'none'}")
    live = CountingLive(check_every=args.check_every, manifest=run.manifest, config=run.config)
    seconds = timed(lambda: [live.on_step(record) for record in run.steps], 1)[0]
    print(f"live diagnosis while {args.steps} steps arrive: {live.checks} checks in {seconds:.2f}s ({1000 * seconds / max(live.checks, 1):.1f} ms per check)")
    if args.disk:
        with tempfile.TemporaryDirectory() as folder:
            path = write_run(run, Path(folder) / "run")
            size = sum(item.stat().st_size for item in path.iterdir()) / 1e6
            read = timed(lambda: read_run(path), 1)[0]
            both = timed(lambda: diagnose(read_run(path)), 1)[0]
            print(f"run directory of {size:.0f} MB: read_run {read:.3f}s, read_run + diagnose {both:.3f}s")
    return 0 if min(times) < args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
