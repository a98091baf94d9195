"""Run-time and memory overhead of the instruments, relative to plain training.

For each problem, preset (``economy``, ``business``, ``full``) and tracking interval, the script
trains the same model on the same batches once plainly (``loss.backward()``) and once with the
instruments, and reports the time per step and the peak memory relative to plain training, as
in Figure 6 of the Cockpit paper. It also times the floor that any exact implementation of the
economy preset must pay (a plain step, forming the per-sample gradients with BackPACK's
``BatchGrad``, and one histogram pass over all N x D per-sample gradient elements) and, at
interval 1, each quantity alone.

How times are measured: every configuration is its own training run (a fresh copy of the same
initial model, plain SGD, the same sequence of batches). Each run first takes ``--warmup``
untimed steps, then all runs take turns, ``--repeats`` times, at timing a window of steps (a whole
number of tracking intervals), so that a change of the machine's load hits all of them alike.
Steps are grouped by what is due at them (a tracked step, the step after it at which Alpha
completes, a step with nothing due); the time per step is the median of each group weighted by
how often the group occurs, which is the mean cost per step in a long run.

How memory is measured: the peak of the bytes held by tensors that the run allocated, from the
moment its model is copied until the end of its warm-up steps (model, gradients, instruments'
state, activations, BackPACK's buffers; the input batches, shared by all runs, are excluded). On
CUDA this is ``torch.cuda.max_memory_allocated`` minus the allocation before the copy; on CPU it
is replayed from the allocation and release events (with their addresses) that ``torch.profiler``
records with ``profile_memory=True``, which sees every block of PyTorch's CPU allocator; releases
of blocks allocated before the window are ignored. (The process's resident size is no measure of
one step: the allocator and the C library keep freed pages.)

Run ``python benchmarks/overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import json
import math
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cockpit_cli.launch import use_huge_pages

use_huge_pages()  # as the `cockpit` script does: before torch is imported

import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from cockpit_cli.instruments import PRESETS, QUANTITIES, Instruments, Schedule
from cockpit_cli.instruments import reductions as r
from cockpit_cli.instruments.allocations import cpu_allocations, peak_of
from cockpit_cli.instruments.presets import COCKPIT_ECONOMY, DIAGNOSTICS
from cockpit_cli.instruments.sample_pass import DenseSamples, sample_statistics
from problems import build_problem
from problems.image_classification import PROBLEM_TABLE, layer_weights

ALL_PROBLEMS = ("quadratic_deep", "mnist1d_mlp", "mnist_mlp", "cifar10_3c3d")
EXTRA_PROBLEMS = ("mnist1d_cnn", "token_bag")  # on request: the quick-start's problem; a language model's embedding table
# token_bag: Embedding(50000, 256) of 128 random token ids per sample, their mean, Linear(256, 10)
TOKEN_BAG = {"vocabulary": 50_000, "width": 256, "positions": 128, "classes": 10, "batch_size": 16}
ALL_PRESETS = ("economy", "business", "full")
COCKPIT_SET = "economy (Cockpit)"  # the published package's nine economy quantities, timed with economy every 1
DEFAULT_INTERVALS = (1, 4, 16)
# Timed steps per window at interval 1, chosen so that the default run takes about ten minutes
# on two CPU cores; at interval k a window is at least one interval and a whole number of them.
DEFAULT_STEPS = {"quadratic_deep": 32, "mnist1d_mlp": 32, "mnist_mlp": 3, "cifar10_3c3d": 3, "mnist1d_cnn": 32, "token_bag": 8}
DEFAULT_QUANTITY_STEPS = {"quadratic_deep": 16, "mnist1d_mlp": 16, "mnist_mlp": 1, "cifar10_3c3d": 1, "mnist1d_cnn": 16, "token_bag": 4}
QUICK_PROBLEMS = ("quadratic_deep", "mnist1d_mlp")
QUICK_INTERVALS = (1, 4)


def user_time() -> float:
    """Return the process's CPU time in user mode (the kernel's work for it left out), in seconds."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time, "user": user_time}
# A configuration whose timed steps spend at least this share of their CPU time in the kernel gets
# a note: its page faults, whose cost varies with the machine (see --clock user), weigh on its time.
KERNEL_NOTE_SHARE = 0.1
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "svhn": (3, 32, 32)}
NUM_BATCHES = 4
MIB = 2.0**20


# -- problems ------------------------------------------------------------------------------


@dataclass
class Case:
    """A problem's model and losses with a fixed sequence of batches.

    Attributes:
        name: Problem name.
        template: The initial model; every run trains its own copy.
        loss_function: Mean-reduced data loss.
        per_sample_loss_function: Per-sample data losses ``[N]``.
        weight_decay: L2 factor of the regulariser ``0.5 * lambda * ||w||^2`` in the loss.
        decayed: Returns the parameters of a model copy that the regulariser applies to.
        batches: The batches, used in turn (step ``t`` uses ``batches[t % len(batches)]``).
        data: How the batches were made, for the report.
    """

    name: str
    template: nn.Module
    loss_function: nn.Module
    per_sample_loss_function: nn.Module
    weight_decay: float
    decayed: Callable[[nn.Module], list[nn.Parameter]]
    batches: list[tuple[Tensor, Tensor]]
    data: str

    @property
    def batch_size(self) -> int:
        return self.batches[0][0].shape[0]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.template.parameters() if p.requires_grad)


def build_case(name: str, data_dir: Path, batch_size: int | None, device: torch.device, seed: int) -> Case:
    """Build the model, losses and batches of problem ``name``.

    Image problems get random inputs of the real shape (no data files are read); quadratic_deep
    and mnist1d_mlp use their real, locally generated training data.
    """
    torch.manual_seed(seed)
    spec = next((s for s in PROBLEM_TABLE if s.name == name), None)
    if name == "token_bag":
        return token_bag_case(batch_size, device)
    if spec is not None:
        template = spec.network()
        size = batch_size or spec.batch_size
        shape = (size, *IMAGE_SHAPES[spec.dataset])
        with torch.no_grad():
            classes = template(torch.zeros(1, *shape[1:])).shape[1]
        batches = [(torch.rand(shape), torch.randint(0, classes, (size,))) for _ in range(NUM_BATCHES)]
        decay = spec.weight_decay

        def decayed(model: nn.Module) -> list[nn.Parameter]:
            return layer_weights(model) if decay else []

        loss, per_sample = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none")
        data = f"random inputs {list(shape)}, {classes} classes"
    else:
        problem = build_problem(name, data_dir, seed=seed)
        template = problem.model
        size = batch_size or problem.info.batch_size or 128
        inputs, targets = next(iter(DataLoader(problem.splits.train, batch_size=size * NUM_BATCHES)))
        batches = [(inputs[i * size : (i + 1) * size], targets[i * size : (i + 1) * size]) for i in range(NUM_BATCHES)]
        decay = problem.weight_decay
        names = {id(p): n for n, p in template.named_parameters()}
        decayed_names = {names[id(p)] for p in problem.decayed_parameters}

        def decayed(model: nn.Module) -> list[nn.Parameter]:
            return [p for n, p in model.named_parameters() if n in decayed_names]

        loss, per_sample = problem.loss_function, problem.per_sample_loss_function
        data = f"training data, batches {list(batches[0][0].shape)}"
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    return Case(name, template.to(device), loss, per_sample, decay, decayed, batches, data)


class TokenBag(nn.Module):
    """An embedding table of ``vocabulary`` rows of ``width``, the mean over a sample's token ids
    ``[N, L]``, and a linear classifier: the table's per-sample gradients touch a few rows each."""

    def __init__(self, vocabulary: int, width: int, classes: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocabulary, width), nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids).mean(1))


def token_bag_case(batch_size: int | None, device: torch.device) -> Case:
    """The case ``token_bag``: :class:`TokenBag` of :data:`TOKEN_BAG` on random token ids."""
    vocabulary, width, positions, classes = (TOKEN_BAG[key] for key in ("vocabulary", "width", "positions", "classes"))
    size = batch_size or TOKEN_BAG["batch_size"]
    batches = [(torch.randint(0, vocabulary, (size, positions), device=device), torch.randint(0, classes, (size,), device=device)) for _ in range(NUM_BATCHES)]
    data = f"random token ids {[size, positions]} of {vocabulary}, {classes} classes"
    return Case("token_bag", TokenBag(vocabulary, width, classes).to(device), nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), 0.0, lambda model: [], batches, data)


# -- one training run ----------------------------------------------------------------------


clock: Callable[[], float] = time.perf_counter
"""The clock every measurement reads: wall-clock time, or the process's CPU time (``--clock``)."""


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One configuration's training run: plain, with ``BatchGrad`` only, or with instruments.

    Args:
        case: The problem.
        label: Name of the configuration in the report.
        quantities: Quantity names to attach, or ``None`` for no instruments.
        every: Tracking interval of the quantities.
        batch_grad: Without instruments: run every backward pass inside BackPACK's
            ``BatchGrad`` and drop the per-sample gradients (no reductions).
        lr: SGD learning rate.
        device: Where to train.
    """

    def __init__(self, case: Case, label: str, quantities: tuple[str, ...] | None, every: int, batch_grad: bool, lr: float, device: torch.device):
        self.case = case
        self.label = label
        self.every = every
        self.device = device
        self.model = copy.deepcopy(case.template)
        self.loss_function = copy.deepcopy(case.loss_function)
        self.per_sample_loss_function = copy.deepcopy(case.per_sample_loss_function)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.decayed = case.decayed(self.model)
        self.batch_grad = batch_grad
        self.instruments: Instruments | None = None
        if quantities is not None:
            schedule = Schedule(every=every)
            chosen = [QUANTITIES[name](schedule) for name in quantities]
            self.instruments = Instruments(
                self.model, self.loss_function, self.per_sample_loss_function, self.optimizer, chosen,
                weight_decay=case.weight_decay, decayed_parameters=self.decayed,
            )
        elif batch_grad:
            extend(self.model)
        self.step = 0
        self.samples: dict[str, list[float]] = {}
        self.cpu_seconds = [0.0, 0.0]  # CPU time of the timed steps: in user mode, in the kernel
        self.peak_bytes: float | None = None
        self.last_per_sample: list[Tensor] = []

    def due(self) -> str:
        """Return the names of the quantities due at the next step (the step's group)."""
        if self.instruments is None:
            return "batch_grad" if self.batch_grad else "plain"
        active = [quantity.name for quantity in self.instruments.quantities if quantity.is_active(self.step)]
        return ",".join(active) or "nothing due"

    def regularization(self) -> Tensor:
        """Return ``0.5 * lambda * sum ||w||^2`` over the decayed weights (as the trainer adds it)."""
        if not self.case.weight_decay or not self.decayed:
            return torch.zeros((), device=self.device)
        return 0.5 * self.case.weight_decay * sum(p.pow(2).sum() for p in self.decayed)

    def train_step(self, keep_per_sample: bool = False) -> float:
        """Take one step and return its duration in seconds on the chosen clock."""
        inputs, targets = self.case.batches[self.step % len(self.case.batches)]
        synchronize(self.device)
        started = clock()
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(inputs)
        loss = self.loss_function(outputs, targets) + self.regularization()
        if self.instruments is not None:
            self.instruments.backward(self.step, loss, inputs, outputs, targets)
        elif self.batch_grad:
            with backpack(BatchGrad()):
                loss.backward()
            self.last_per_sample = [p.__dict__.pop("grad_batch") for p in self.model.parameters() if hasattr(p, "grad_batch")]
            if not keep_per_sample:
                self.last_per_sample = []
        else:
            loss.backward()
        self.optimizer.step()
        if self.instruments is not None:
            self.instruments.after_update(self.step)
            self.instruments.completed(self.step)
        synchronize(self.device)
        elapsed = clock() - started
        self.step += 1
        return elapsed

    def timed_window(self, steps: int) -> None:
        """Time ``steps`` steps, filing each under the group of what was due at it."""
        for _ in range(steps):
            group = self.due()
            before = resource.getrusage(resource.RUSAGE_SELF)
            self.samples.setdefault(group, []).append(self.train_step())
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu_seconds[0] += after.ru_utime - before.ru_utime
            self.cpu_seconds[1] += after.ru_stime - before.ru_stime

    def kernel_share(self) -> float:
        """Return the share of the timed steps' CPU time spent in the kernel (page faults, mostly)."""
        total = sum(self.cpu_seconds)
        return self.cpu_seconds[1] / total if total > 0 else 0.0

    def seconds_per_step(self) -> float:
        """Mean cost per step in a long run: each group's median, weighted by its share of steps."""
        total = sum(len(times) for times in self.samples.values())
        return sum(len(times) * statistics.median(times) for times in self.samples.values()) / total

    def switched_off(self) -> dict[str, str]:
        """Return the quantities the instruments switched off (unavailable or failed), with reasons."""
        return dict(self.instruments.unavailable) if self.instruments is not None else {}


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what native code prints to the process's stdout and stderr (the profiler's messages)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for handle in saved:
                os.close(handle)


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict[str, float]) -> Iterator[None]:
    """Measure the peak bytes held by tensors allocated inside the block into ``result["peak"]``."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        synchronize(device)
        result["peak"] = float(torch.cuda.max_memory_allocated(device) - base)
        return
    gc.collect()  # garbage of earlier runs must not be released inside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield
    result["peak"] = float(peak_of(cpu_allocations(profiler)))


def start_run(case: Case, label: str, quantities: tuple[str, ...] | None, every: int, batch_grad: bool, args: argparse.Namespace) -> Run:
    """Build a run and take its warm-up steps, measuring the peak memory of both."""
    measured: dict[str, float] = {}
    with quiet_native_output(), peak_memory(args.device, measured):
        run = Run(case, label, quantities, every, batch_grad, args.lr, args.device)
        for _ in range(args.warmup):
            run.train_step()
    run.peak_bytes = measured["peak"]
    return run


# -- measurements --------------------------------------------------------------------------


def window(steps: int, every: int) -> int:
    """Return the number of steps of a timing window: at least ``steps``, whole intervals."""
    return every * max(1, math.ceil(steps / every))


def take_turns(runs: list[tuple[Run, int]], repeats: int, progress: Callable[[str], None]) -> None:
    """Time every run's window ``repeats`` times, the runs taking turns."""
    for repeat in range(repeats):
        for run, steps in runs:
            progress(f"{run.case.name}: {run.label} (repeat {repeat + 1}/{repeats})")
            run.timed_window(steps)


def median_seconds(function: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Return the median wall-clock seconds of ``function()`` over ``repeats`` calls (after one untimed call)."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = clock()
        function()
        synchronize(device)
        times.append(clock() - started)
    return statistics.median(times)


def histogram_seconds(run: Run, repeats: int) -> dict[str, float]:
    """Time one histogram pass over all N x D per-sample gradient elements of a BatchGrad step.

    ``histc`` is a single ``torch.histc`` per parameter block (values outside the range are not
    counted); ``engine`` is the engine's 1-D histogram kernel (clamped bin indices and
    ``torch.bincount``), on the same blocks.
    """
    run.train_step(keep_per_sample=True)
    blocks = [samples.mul_(samples.shape[0]) for samples in run.last_per_sample]
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.last_per_sample = []
    options = r.ReductionOptions()
    spec = options.hist1d

    def histc() -> None:
        for samples in blocks:
            torch.histc(samples, bins=spec.bins, min=spec.low, max=spec.high)

    def engine() -> None:
        for samples, param in zip(blocks, params):
            sample_statistics(DenseSamples(samples), None, frozenset({r.HIST1D_COUNTS}), param.detach().reshape(-1), options)

    return {"histc": median_seconds(histc, repeats, run.device), "engine": median_seconds(engine, repeats, run.device), "elements": float(sum(b.numel() for b in blocks))}


@dataclass
class Row:
    """One line of the report."""

    label: str
    preset: str | None
    every: int
    seconds: float
    ratio: float
    peak_mib: float | None
    memory_ratio: float | None
    steps_timed: int
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    switched_off: dict[str, str] = field(default_factory=dict)
    kernel_share: float = 0.0


def row_of(run: Run, plain: Run, preset: str | None) -> Row:
    """Summarise a run against the plain run."""
    seconds, base = run.seconds_per_step(), plain.seconds_per_step()
    peak = None if run.peak_bytes is None else run.peak_bytes / MIB
    memory_ratio = None if run.peak_bytes is None or not plain.peak_bytes else run.peak_bytes / plain.peak_bytes
    groups = {group: {"steps": len(times), "median_s": statistics.median(times)} for group, times in run.samples.items()}
    steps = sum(len(t) for t in run.samples.values())
    return Row(run.label, preset, run.every, seconds, seconds / base, peak, memory_ratio, steps, groups, run.switched_off(), run.kernel_share())


def benchmark_problem(name: str, args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure every configuration of problem ``name``; return the results as plain data."""
    case = build_case(name, args.data_dir, args.batch_size, args.device, args.seed)
    steps = args.steps or DEFAULT_STEPS.get(name, 16)
    quantity_steps = args.quantity_steps or DEFAULT_QUANTITY_STEPS.get(name, max(1, steps // 2))
    longest = window(steps, max(args.intervals))
    progress(f"{name}: warm-up")
    plain = start_run(case, "plain", None, 1, False, args)
    batch_grad = start_run(case, "BatchGrad only", None, 1, True, args)
    preset_runs = [(preset, start_run(case, f"{preset} every {every}", PRESETS[preset], every, False, args)) for preset in args.presets for every in args.intervals]
    if "economy" in args.presets and 1 in args.intervals:  # the published package's economy: without the diagnostics
        preset_runs.append((COCKPIT_SET, start_run(case, "economy (Cockpit's set) every 1", COCKPIT_ECONOMY, 1, False, args)))
    turns = [(plain, longest), (batch_grad, steps)] + [(run, window(steps, run.every)) for _, run in preset_runs]
    take_turns(turns, args.repeats, progress)
    quantity_runs: list[Run] = []
    if not args.no_quantities:
        names = list(dict.fromkeys(name for preset in args.presets for name in PRESETS[preset]))
        progress(f"{name}: warm-up of the single quantities")
        quantity_runs = [start_run(case, quantity, (quantity,), 1, False, args) for quantity in names]
        take_turns([(plain, quantity_steps)] + [(run, quantity_steps) for run in quantity_runs], args.repeats, progress)
    progress(f"{name}: histogram pass")
    histogram = histogram_seconds(batch_grad, args.hist_repeats)
    plain_s, batch_grad_s = plain.seconds_per_step(), batch_grad.seconds_per_step()
    per_sample_s = batch_grad_s - plain_s
    histogram_s = min(histogram["histc"], histogram["engine"])
    floor_s = plain_s + per_sample_s + histogram_s
    economy = next((run for preset, run in preset_runs if preset == "economy" and run.every == 1), None)
    cockpit_economy = next((run for preset, run in preset_runs if preset == COCKPIT_SET), None)
    result: dict[str, Any] = {
        "problem": name,
        "data": case.data,
        "batch_size": case.batch_size,
        "parameters": case.num_parameters,
        "steps": steps,
        "quantity_steps": quantity_steps,
        "plain": asdict(row_of(plain, plain, None)),
        "batch_grad": asdict(row_of(batch_grad, plain, None)),
        "presets": [asdict(row_of(run, plain, preset)) for preset, run in preset_runs],
        "quantities": [asdict(row_of(run, plain, None)) for run in quantity_runs],
        "floor": {
            "plain_s": plain_s,
            "per_sample_s": per_sample_s,
            "batch_grad_step_s": batch_grad_s,
            "histc_s": histogram["histc"],
            "engine_histogram_s": histogram["engine"],
            "histogram_s": histogram_s,
            "histogram_elements": histogram["elements"],
            "floor_s": floor_s,
            "floor_ratio": floor_s / plain_s,
            "economy_s": economy.seconds_per_step() if economy else None,
            "economy_to_floor": economy.seconds_per_step() / floor_s if economy else None,
            "cockpit_economy_s": cockpit_economy.seconds_per_step() if cockpit_economy else None,
            "cockpit_economy_to_floor": cockpit_economy.seconds_per_step() / floor_s if cockpit_economy else None,
        },
    }
    return result


# -- profile ------------------------------------------------------------------------------


def profile_problem(name: str, preset: str, args: argparse.Namespace, top: int = 20) -> str:
    """Profile one tracked step of ``preset`` (interval 1, after warm-up); return the report text.

    The report lists the PyTorch operators with the largest self CPU (or CUDA) time, and the
    Python functions with the largest cumulative time (cProfile) in a second, separate step.
    """
    case = build_case(name, args.data_dir, args.batch_size, args.device, args.seed)
    run = start_run(case, f"{preset} every 1", PRESETS[preset], 1, False, args)
    lines = [f"== profile of one {preset} step on {name} (interval 1, step {run.step}) =="]
    with quiet_native_output():
        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else []))
        profiler.__enter__()
    seconds = run.train_step()
    with quiet_native_output():
        profiler.__exit__(None, None, None)
    sort = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    lines.append(f"step took {seconds:.3f} s under torch.profiler; operators by self time:")
    lines.append(profiler.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48))
    profiler_python = cProfile.Profile()
    profiler_python.enable()
    seconds = run.train_step()
    profiler_python.disable()
    text = io.StringIO()
    pstats.Stats(profiler_python, stream=text).sort_stats("cumulative").print_stats(top * 2)
    lines.append(f"step took {seconds:.3f} s under cProfile; functions by cumulative time:")
    lines.append(text.getvalue())
    return "\n".join(lines)


def fresh_memory_rates(mib: int = 64, repeats: int = 3) -> tuple[float, float]:
    """Return the wall seconds per GiB to allocate and fill fresh CPU memory, and to fill it again
    (medians over ``repeats`` blocks of ``mib`` MiB).

    The first includes faulting the pages in, which every step pays for its large tensors
    (BatchGrad's per-sample gradients, curvature factors). Where page faults are slow (a busy
    host, memory being reclaimed) the configurations that allocate hundreds of MiB per step run
    slower and more unevenly; this line tells such a machine from a slower change of the code.
    """
    elements = mib * 2**20 // 4
    fresh, again = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        block = torch.empty(elements).fill_(1.0)
        filled = time.perf_counter()
        block.fill_(2.0)
        fresh.append(filled - started)
        again.append(time.perf_counter() - filled)
        del block
    per_gib = 1024 / mib
    return statistics.median(fresh) * per_gib, statistics.median(again) * per_gib


def memory_line(when: str) -> str:
    """Return the report's line on how fast this machine gives fresh memory, measured now."""
    fresh, again = fresh_memory_rates()
    return f"CPU memory ({when}): {fresh:.2f} s per GiB allocated and filled fresh, {again:.2f} s filled again"


# -- report -------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Return a plain text table with aligned columns (``right``: right-aligned column indices)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def seconds_text(seconds: float) -> str:
    """Format a duration with a unit that keeps three significant digits."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_row(row: dict[str, Any], label: str | None = None) -> list[str]:
    """Return the cells of a configuration line."""
    memory = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
    memory_ratio = "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}"
    notes = [f"{name} off" for name in row["switched_off"]]
    if row["kernel_share"] >= KERNEL_NOTE_SHARE:
        notes.append(f"kernel {row['kernel_share']:.0%} of CPU time")
    note = "; ".join(notes)
    return [label or row["label"], seconds_text(row["seconds"]), f"{row['ratio']:.2f}", memory, memory_ratio, str(row["steps_timed"]), note]


def step_kinds(row: dict[str, Any], plain_s: float) -> list[str]:
    """Return one text per kind of step of a configuration, the dearest first: a tracked step (all
    of the preset due), a step that only ends Alpha, a step with nothing due."""
    cells = []
    for group, timing in sorted(row["groups"].items(), key=lambda item: -item[1]["median_s"]):
        if "," in group:
            name = f"tracked ({group.count(',') + 1} quantities)"
        elif group == "nothing due":
            name = group
        else:
            name = f"{group} only"  # e.g. Alpha only: the step after a tracked one
        cells.append(f"{name} {seconds_text(timing['median_s'])} ({timing['median_s'] / plain_s:.2f}, {timing['steps']})")
    return cells


def report(result: dict[str, Any]) -> str:
    """Return the text report of one problem."""
    header = ["configuration", "time/step", "x plain", "peak MiB", "x plain", "steps", "notes"]
    rows = [format_row(result["plain"]), format_row(result["batch_grad"])]
    rows += [format_row(row) for row in result["presets"]]
    floor = result["floor"]
    lines = [
        f"{result['problem']}: batch {result['batch_size']}, {result['parameters']:,} trainable parameters, {result['data']}",
        table(header, rows, right={1, 2, 3, 4, 5}),
        "",
        "floor for exact economy (each part timed alone):",
        table(
            ["part", "time", "x plain"],
            [
                ["plain step", seconds_text(floor["plain_s"]), "1.00"],
                ["+ per-sample gradients (BatchGrad, no reductions)", seconds_text(floor["per_sample_s"]), f"{floor['per_sample_s'] / floor['plain_s']:.2f}"],
                [f"+ one histogram pass over N x D = {floor['histogram_elements']:,.0f} elements (the faster below)", seconds_text(floor["histogram_s"]), f"{floor['histogram_s'] / floor['plain_s']:.2f}"],
                ["= floor", seconds_text(floor["floor_s"]), f"{floor['floor_ratio']:.2f}"],
                ["  histogram by torch.histc", seconds_text(floor["histc_s"]), f"{floor['histc_s'] / floor['plain_s']:.2f}"],
                ["  histogram by the engine's kernel (bin indices, bincount)", seconds_text(floor["engine_histogram_s"]), f"{floor['engine_histogram_s'] / floor['plain_s']:.2f}"],
            ],
            right={1, 2},
        ),
    ]
    if floor["economy_to_floor"] is not None:
        lines.append(f"economy every 1: {seconds_text(floor['economy_s'])} = {floor['economy_to_floor']:.2f} x floor")
    if floor.get("cockpit_economy_to_floor") is not None:
        lines.append(f"economy (Cockpit's set, without {', '.join(DIAGNOSTICS)}) every 1: {seconds_text(floor['cockpit_economy_s'])} = {floor['cockpit_economy_to_floor']:.2f} x floor")
    kinds = [row for row in result["presets"] if row["every"] > 1]
    if kinds:
        lines += ["", "kinds of step of the tracking intervals above 1 (median, x plain, steps):"]
        lines += [f"  {row['label']}: " + "; ".join(step_kinds(row, floor["plain_s"])) for row in kinds]
    if result["quantities"]:
        lines += ["", "each quantity alone, every step:"]
        lines.append(table(header, [format_row(row) for row in result["quantities"]], right={1, 2, 3, 4, 5}))
    switched = {name: reason for row in [*result["presets"], *result["quantities"]] for name, reason in row["switched_off"].items()}
    lines += [f"  {name} switched off: {reason}" for name, reason in switched.items()]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and complete the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(ALL_PROBLEMS), choices=ALL_PROBLEMS + EXTRA_PROBLEMS, metavar="PROBLEM", help=f"from {', '.join(ALL_PROBLEMS + EXTRA_PROBLEMS)} (default: all but {', '.join(EXTRA_PROBLEMS)})")
    parser.add_argument("--presets", nargs="+", default=list(ALL_PRESETS), choices=ALL_PRESETS, metavar="PRESET", help=f"from {', '.join(ALL_PRESETS)} (default: all)")
    parser.add_argument("--intervals", nargs="+", type=int, default=list(DEFAULT_INTERVALS), help="tracking intervals, every k steps (default: 1 4 16)")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per window at interval 1 (default per problem: {DEFAULT_STEPS})")
    parser.add_argument("--quantity-steps", type=int, default=None, help=f"timed steps per window of each single quantity (default per problem: {DEFAULT_QUANTITY_STEPS})")
    parser.add_argument("--repeats", type=int, default=2, help="timing windows per configuration, the configurations taking turns (default: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration before timing; memory is measured over them (default: 2)")
    parser.add_argument("--hist-repeats", type=int, default=5, help="timed histogram passes (default: 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the problem's)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument(
        "--clock", default="wall", choices=sorted(CLOCKS),
        help=(
            "wall: elapsed time (default); cpu: the process's CPU time, which other processes' load does not inflate (use it with --threads 1); "
            "user: its CPU time in user mode, without the kernel's page faults, which on some virtual machines cost ten times more at one step than "
            "at the next (for steps of tens of milliseconds and more: the kernel splits CPU time into user and system time by sampling)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the random batches (default: 0)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where MNIST-1D is generated (default: a temporary folder)")
    parser.add_argument("--no-quantities", action="store_true", help="skip the per-quantity lines")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute: small problems, few steps")
    parser.add_argument("--profile", metavar="PRESET", choices=ALL_PRESETS, default=None, help="instead of the benchmark, profile one tracked step of PRESET on each problem")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--nproc", type=int, default=None, metavar="W",
        help="also time the presets on 1 and W data-parallel processes (a table from data_parallel.py with the columns for W processes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        if args.problems == list(ALL_PROBLEMS):
            args.problems = list(QUICK_PROBLEMS)
        if args.intervals == list(DEFAULT_INTERVALS):
            args.intervals = list(QUICK_INTERVALS)
        args.steps = args.steps or 8
        args.quantity_steps = args.quantity_steps or 4
    if min(args.intervals) < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--intervals, --repeats and --warmup must be at least 1")
    if args.clock != "wall" and args.device == "cuda":
        parser.error(f"--clock {args.clock} measures CPU work; on CUDA use --clock wall")
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or the profile) and print the report."""
    global clock
    args = parse_arguments(argv)
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        args.data_dir = args.data_dir or Path(scratch)
        print(f"torch {torch.__version__}, device {args.device}, torch.set_num_threads({torch.get_num_threads()}), {os.cpu_count()} CPUs, {args.clock} clock", flush=True)
        memory_lines = [memory_line("at the start")]
        print(memory_lines[0], flush=True)
        if args.profile:
            for name in args.problems:
                print(profile_problem(name, args.profile, args), flush=True)
            return
        started = time.perf_counter()

        def progress(message: str) -> None:
            print(f"  [{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

        results = []
        for name in args.problems:
            result = benchmark_problem(name, args, progress)
            results.append(result)
            print("\n" + report(result), flush=True)
        if args.nproc:
            import data_parallel

            print(f"\ndata-parallel: 1 and {args.nproc} processes (benchmarks/data_parallel.py)", flush=True)
            data_parallel.main(
                ["--problems", *args.problems, "--presets", *args.presets, "--intervals", *map(str, args.intervals), "--nproc", "1", str(args.nproc), "--device", args.device, "--clock", args.clock]
            )
        total = time.perf_counter() - started
        memory_lines.append(memory_line("at the end"))
        print("\n" + memory_lines[-1], flush=True)
        print(f"total {total:.0f} s wall; times ({args.clock} clock) are per-group medians weighted by the groups' shares of steps, {args.repeats} repeat(s)", flush=True)
        if args.json:
            settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
            settings["threads"] = torch.get_num_threads()
            args.json.write_text(json.dumps({"settings": settings, "torch": torch.__version__, "seconds": total, "memory": memory_lines, "results": results}, indent=1))


if __name__ == "__main__":
    main()
