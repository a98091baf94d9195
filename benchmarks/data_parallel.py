"""Overhead of the instruments in data-parallel training, next to one process.

For each problem, preset and tracking interval, the same global batches are trained once plainly
and once with the instruments, on 1 and on W processes (``--nproc``, default 1 2): each process
takes its equal shard of every batch, DistributedDataParallel averages the gradients, and the
instruments combine their sums across processes. Each process count is its own
``torch.distributed.run`` launch of this script in ``--worker`` mode (Gloo on the CPU, NCCL with
``--device cuda``, one GPU per process); rank 0 times whole steps on the chosen clock and writes
them to a JSON file the table is built from. Models and batches come from ``overhead.py``.

Columns: ``s/step`` is the median time per step (each process count's plain and instrumented
runs take turns, ``--repeats`` windows each), ``x plain`` divides by the plain run with the same
number of processes, and ``speed-up`` divides one process's time by W processes' time. On W CPU
cores a process gets ``cores / W`` threads (``OMP_NUM_THREADS``), so the speed-up says how well
the work splits; the ratio says what the instruments cost at that scale.

Run ``python benchmarks/data_parallel.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_PROBLEMS = ("mnist1d_mlp", "cifar10_3c3d")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(DEFAULT_PROBLEMS), help="problems of overhead.py (default: mnist1d_mlp cifar10_3c3d)")
    parser.add_argument("--presets", nargs="+", default=["economy"], help="presets (default: economy)")
    parser.add_argument("--intervals", nargs="+", type=int, default=[1, 16], help="tracking intervals (default: 1 16)")
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per window (default: 16; at least one interval is used)")
    parser.add_argument("--repeats", type=int, default=2, help="timed windows per configuration (default: 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu", "user"), help="wall-clock time, the process's CPU time, or its CPU time in user mode")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # set for the launched processes
    return parser.parse_args(argv)


# -- one launch: the processes time plain and instrumented steps ---------------------------------


def worker(args: argparse.Namespace) -> None:
    """Inside ``torch.distributed.run``: time every configuration; rank 0 writes the results."""
    from cockpit_cli.launch import use_huge_pages

    use_huge_pages()  # as the `cockpit` script does: before torch is imported
    import torch
    import torch.distributed as dist
    from torch import nn

    sys.path.insert(0, str(HERE))
    import overhead

    from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Schedule
    from cockpit_cli.instruments.sync import GroupSynchronizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    sync = GroupSynchronizer(dist.new_group(backend=backend))
    clock = overhead.CLOCKS[args.clock]
    data_dir = Path(tempfile.mkdtemp(prefix="cockpit-dp-"))
    results: dict[str, Any] = {"world_size": world, "threads": torch.get_num_threads(), "rows": []}
    for name in args.problems:
        case = overhead.build_case(name, data_dir, None, device, seed=0)
        if case.batch_size % world:
            results["rows"].append({"problem": name, "skipped": f"batch {case.batch_size} does not split into {world}"})
            continue
        shard = case.batch_size // world
        batches = [(x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]) for x, y in case.batches]
        configurations = [("plain", None, 1)] + [(f"{preset} every {k}", PRESETS[preset], k) for preset in args.presets for k in args.intervals]
        runs = []
        for label, names, every in configurations:
            model = nn.parallel.DistributedDataParallel(_copy(case.template), device_ids=[device.index] if device.type == "cuda" else None)
            inner = model.module
            optimizer = torch.optim.SGD(inner.parameters(), lr=0.01)
            instruments = None
            if names is not None:
                quantities = [QUANTITIES[q](Schedule(every=every)) for q in names]
                instruments = Instruments(inner, case.loss_function, case.per_sample_loss_function, optimizer, quantities, weight_decay=case.weight_decay, decayed_parameters=case.decayed(inner), sync=sync)
            runs.append({"label": label, "model": model, "optimizer": optimizer, "instruments": instruments, "every": every, "step": 0, "times": []})

        def step(run: dict) -> float:
            inputs, targets = batches[run["step"] % len(batches)]
            overhead.synchronize(device)
            dist.barrier()
            started = clock()
            run["optimizer"].zero_grad(set_to_none=True)
            outputs = run["model"](inputs)
            loss = case.loss_function(outputs, targets)
            if run["instruments"] is None:
                loss.backward()
            else:
                run["instruments"].backward(run["step"], loss, inputs, outputs, targets)
            run["optimizer"].step()
            if run["instruments"] is not None:
                run["instruments"].after_update(run["step"])
                run["instruments"].completed(run["step"])
            overhead.synchronize(device)
            run["step"] += 1
            return clock() - started

        for run in runs:
            for _ in range(2):
                step(run)  # warm-up
        for _ in range(args.repeats):
            for run in runs:
                window = max(args.steps // run["every"], 1) * run["every"]
                run["times"] += [step(run) for _ in range(window)]
        plain = statistics.mean(runs[0]["times"])
        for run in runs:
            seconds = statistics.mean(run["times"])
            results["rows"].append({"problem": name, "label": run["label"], "seconds": seconds, "ratio": seconds / plain, "batch": case.batch_size})
    if rank == 0:
        args.worker.write_text(json.dumps(results), encoding="utf-8")
    dist.destroy_process_group()


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


# -- the launcher and the table --------------------------------------------------------------------


def launch(args: argparse.Namespace, nproc: int, out: Path) -> dict[str, Any]:
    """Run this script's worker on ``nproc`` processes and return rank 0's results."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc if args.device == "cpu" else 1))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(Path(__file__).resolve())]
    command += ["--worker", str(out), "--problems", *args.problems, "--presets", *args.presets, "--intervals", *map(str, args.intervals)]
    command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device, "--clock", args.clock]
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text(encoding="utf-8"))


def report(results: dict[int, dict[str, Any]]) -> str:
    counts = sorted(results)
    header = ["problem", "configuration"]
    for count in counts:
        header += [f"{count} proc s/step", f"{count} proc x plain"]
    header += [f"speed-up {count} proc" for count in counts[1:]]
    rows = []
    for index, base in enumerate(results[counts[0]]["rows"]):
        if "skipped" in base:
            continue
        line = [base["problem"], base["label"]]
        for count in counts:
            row = results[count]["rows"][index]
            line += ["-", "-"] if "skipped" in row else [f"{row['seconds'] * 1e3:.1f} ms", f"{row['ratio']:.2f}"]
        for count in counts[1:]:
            row = results[count]["rows"][index]
            line.append("-" if "skipped" in row else f"{base['seconds'] / row['seconds']:.2f}")
        rows.append(line)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    threads = ", ".join(f"{count} proc: {results[count]['threads']} threads each" for count in counts)
    return "\n".join(lines) + f"\n({threads})"


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.worker is not None:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for count in args.nproc:
            results[count] = launch(args, count, Path(folder) / f"{count}.json")
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
