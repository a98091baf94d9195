"""The dashboard's in-memory view of a run, fed with plain values (no torch).

Memory stays bounded: every scalar history is a :class:`Series` of compact arrays, the
Alpha distribution is kept as running bin counts, and of the bulky quantities (histograms,
per-layer statistics) only the latest value is kept. Every update is O(1) in the number of
steps seen so far, so an observer can call it from the training loop.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, field
from typing import Any

from cockpit_cli.display.sparkline import Series
from cockpit_cli.storage import schema
from cockpit_cli.storage.totals import quantity_total
from cockpit_cli.training.events import not_tracked_lines

ALPHA_RANGE = (-1.5, 1.5)
ALPHA_BINS = 15  # odd, so that one bin is centred on the ideal 0
LATEST = ("GradHist1d", "GradHist2d", "LayerStats", "Activations", "InputStats")
EMA_BETA = 0.95
ALERT_LIMIT = 20
NAMED = 4  # non-finite quantities named in their alert (the rest counted)
SEVERITIES = ("info", "warning", "critical")  # green: fine, yellow: watch, red: act
Alert = tuple[str, str]


def _device_text(data: dict[str, Any]) -> str:
    """``cpu``, or ``cpu ×2 (gloo)`` for a data-parallel run of two processes."""
    device = str(data.get("device") or "?")
    processes = data.get("processes") or {}
    world = processes.get("world_size") or 1
    return f"{device} ×{world} ({processes.get('backend')})" if world > 1 else device


@dataclass
class RunInfo:
    """Facts fixed at the start of a run (from :class:`RunMeta` or a manifest)."""

    problem: str = "?"
    optimizer: str = "?"
    device: str = "?"
    total_steps: int = 0
    steps_per_epoch: int = 0
    batch_size: int = 0
    micro_batches: int = 0  # where a step's gradients accumulate over several backward passes
    num_parameters: int = 0
    parameters: list[str] = field(default_factory=list)
    lookup_tables: set[str] = field(default_factory=set)  # embedding tables (schema.lookup_tables)
    tracked: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None
    trace_title: str = "Hessian trace"  # HessTrace's, for the run's curvature diagonal (schema.trace_names)

    @property
    def batch_text(self) -> str:
        """The batch size, with its micro-batches where gradients accumulate over them."""
        return f"{self.batch_size} ({self.micro_batches} micro-batches)" if self.micro_batches > 1 else str(self.batch_size)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], run_dir: str | None = None) -> RunInfo:
        """Build from a manifest-like mapping (``run.json`` or the fields of a RunMeta)."""
        instruments = data.get("instruments") or {}
        return cls(
            problem=str(data.get("problem") or "?"),
            optimizer=str(data.get("optimizer") or "?"),
            device=_device_text(data),
            total_steps=int(data.get("total_steps") or 0),
            steps_per_epoch=int(data.get("steps_per_epoch") or 0),
            batch_size=int(data.get("batch_size") or 0),
            micro_batches=int(data.get("micro_batches") or 0),
            num_parameters=int(data.get("num_parameters") or 0),
            parameters=list(instruments.get("parameters") or []),
            lookup_tables=schema.lookup_tables(data),
            tracked=list(instruments.get("quantities") or []),
            unavailable=dict(instruments.get("unavailable") or {}),
            run_dir=run_dir,
            trace_title=schema.trace_names(data)[0],
        )


def sorted_median(values: list[float]) -> float | None:
    """The median of ``values``, which are sorted (``None`` for none)."""
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


@dataclass
class DashboardState:
    """Everything the panels show. Panels read it; only the update methods below write it.

    Attributes:
        info: Facts of the run.
        status: ``waiting``, ``running``, or the final status.
        message: Why the run stopped early (or ``None``).
        step: Index of the latest recorded step (-1 before the first).
        epoch: Epoch of the latest step or evaluation.
        time: Seconds since training started, at the latest record.
        clock: Seconds since the start as of now, while a run is live (else ``None``).
        lr: Learning rates of the latest step, one per parameter group.
        series: Scalar histories by name: ``loss``, ``loss_ema``, ``lr``, ``time`` and the
            instrument quantities (per-parameter norms reduced to the total norm).
        alpha_counts: Running histogram of every Alpha value over :data:`ALPHA_RANGE`.
        alpha_median: Median of every finite Alpha value so far (``None`` before the first).
        latest: The latest value of each bulky quantity (histograms, per-layer statistics).
        latest_step: The step each entry of ``latest`` comes from.
        evals: One ``{step, epoch, time, splits: {name: {loss, accuracy}}}`` per evaluation.
        alerts: Current alerts by key, each ``(severity, text)``; a diagnosis engine may add more.
        nonfinite: Each quantity that has been non-finite, with its first such value (one alert
            names them all: after a divergence every quantity is, and an alert each pushed the
            loss's own out of view).
        nonfinite_since: The step of the first of them.
        version: Incremented on every change, so a renderer can tell when to redraw.
    """

    info: RunInfo = field(default_factory=RunInfo)
    status: str = "waiting"
    message: str | None = None
    step: int = -1
    epoch: int = 0
    time: float = 0.0
    clock: float | None = None
    lr: list[float] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    alpha_counts: list[int] = field(default_factory=lambda: [0] * ALPHA_BINS)
    alpha_median: float | None = None
    latest: dict[str, Any] = field(default_factory=dict)
    latest_step: dict[str, int] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    alerts: dict[str, Alert] = field(default_factory=dict)
    loss_start: float | None = None
    nonfinite: dict[str, float] = field(default_factory=dict)  # quantity -> its first non-finite value
    nonfinite_since: int = -1
    version: int = 0
    _ema: float = field(default=0.0, repr=False)
    _alpha_sorted: list[float] = field(default_factory=list, repr=False)  # for the median; snapshots take the number only

    # -- updates ---------------------------------------------------------------------------

    def start(self, info: RunInfo) -> None:
        """Begin a run described by ``info``."""
        self.info, self.status = info, "running"
        for line in not_tracked_lines(info.unavailable):
            self.add_alert("warning", line)
        self.version += 1

    def add_step(self, step: int, epoch: int, loss: float, lr: list[float], time: float, quantities: dict[str, Any]) -> None:
        """Record one training step (the dicts in ``quantities`` are kept by reference)."""
        self.step, self.epoch, self.time, self.lr = step, max(self.epoch, epoch), time, lr
        self._append("loss", step, loss)
        self._append("time", step, time)
        if lr:
            self._append("lr", step, lr[0])
        if math.isfinite(loss):
            self._track_loss(step, loss)
        elif "loss:nonfinite" not in self.alerts:
            self.add_alert("critical", f"loss is {loss} at step {step}: the run diverged", key="loss:nonfinite")
        for name, value in quantities.items():
            if name in LATEST:
                self.latest[name], self.latest_step[name] = value, step
                continue
            total = quantity_total(name, value)
            if total is None:
                continue
            self._append(name, step, total)
            if name == "Alpha" and math.isfinite(total):
                low, high = ALPHA_RANGE
                index = int((total - low) / (high - low) * ALPHA_BINS)
                self.alpha_counts[min(max(index, 0), ALPHA_BINS - 1)] += 1
                bisect.insort(self._alpha_sorted, total)
                self.alpha_median = sorted_median(self._alpha_sorted)
            elif not math.isfinite(total) and name not in self.nonfinite:
                self._note_nonfinite(step, name, total)
        self.version += 1

    def _note_nonfinite(self, step: int, name: str, value: float) -> None:
        """Name ``name`` in the one alert of non-finite quantities (which keeps its place)."""
        if not self.nonfinite:
            self.nonfinite_since = step
        self.nonfinite[name] = value
        named = [f"{quantity} {first}" for quantity, first in self.nonfinite.items()]
        shown = ", ".join(named[:NAMED]) + (f" and {len(named) - NAMED} more" if len(named) > NAMED else "")
        self.add_alert("critical", f"non-finite since step {self.nonfinite_since}: {shown}", key="nonfinite:quantities", keep_place=True)

    def add_step_record(self, record: dict[str, Any]) -> None:
        """Record a step given as in the run directory (a line of ``steps.jsonl``)."""
        step, epoch, time = int(record["step"]), int(record.get("epoch", 0)), float(record.get("time", 0.0))
        loss, lr = float(record.get("loss", math.nan)), [float(rate) for rate in record.get("lr") or []]
        self.add_step(step, epoch, loss, lr, time, dict(record.get("quantities") or {}))

    def add_eval_record(self, record: dict[str, Any]) -> None:
        """Record an evaluation given as in the run directory (a line of ``evals.jsonl``)."""
        splits = {name: dict(metrics) for name, metrics in (record.get("splits") or {}).items()}
        self.add_eval(int(record["step"]), int(record.get("epoch", 0)), float(record.get("time", 0.0)), splits)

    def add_eval(self, step: int, epoch: int, time: float, splits: dict[str, dict[str, Any]]) -> None:
        """Record an evaluation: ``splits`` maps a split name to ``{loss, accuracy}``."""
        kept = {name: {"loss": m.get("loss"), "accuracy": m.get("accuracy")} for name, m in splits.items()}
        self.evals.append({"step": step, "epoch": epoch, "time": time, "splits": kept})
        self.epoch = max(self.epoch, epoch)
        losses = [f"{name} loss {metrics['loss']}" for name, metrics in kept.items() if isinstance(metrics["loss"], float) and not math.isfinite(metrics["loss"])]
        if losses and "eval:nonfinite" not in self.alerts:  # the first such evaluation; later ones say the same
            self.add_alert("critical", f"{', '.join(losses)} at the evaluation after step {step}", key="eval:nonfinite")
        self.version += 1

    def finish(self, status: str, message: str | None = None, seconds: float | None = None) -> None:
        """Mark the run as ended with ``status`` (``completed``, ``diverged``, ...)."""
        self.status, self.message, self.clock = status, message, None
        if seconds is not None:
            self.time = max(self.time, seconds)
        if status in ("diverged", "failed"):
            if message:  # says where the loss became non-finite, and more
                self.alerts.pop("loss:nonfinite", None)
            self.add_alert("critical", f"run {status}: {message}" if message else f"run {status}", key="run:end")
        elif status == "interrupted":
            self.add_alert("warning", message or "run interrupted", key="run:end")
        self.version += 1

    def add_warning(self, text: str) -> None:
        """Show a warning that arose during the run; quantities switched off (``"<name>, <name>
        switched off: <reason>"``) also say so in their panels from then on."""
        names, switched, reason = text.partition(" switched off: ")
        for name in names.split(", ") if switched else []:
            if name in self.info.tracked:
                self.info.unavailable[name] = reason
        self.add_alert("warning", text)

    def add_alert(self, severity: str, text: str, key: str | None = None, keep_place: bool = False) -> None:
        """Add or replace an alert; ``severity`` is one of :data:`SEVERITIES`. A replaced alert
        becomes the newest, unless ``keep_place`` (an alert that grows, such as the list of
        quantities gone non-finite, is still as old as its first line)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
        if not keep_place:
            self.alerts.pop(key or text, None)
        self.alerts[key or text] = (severity, text)
        while len(self.alerts) > ALERT_LIMIT:
            self.alerts.pop(next(iter(self.alerts)))
        self.version += 1

    def snapshot(self, clock: float | None = None) -> DashboardState:
        """Return a small copy that later updates do not change (see :meth:`Series.copy`)."""
        copied = copy.copy(self)
        copied.info = copy.copy(self.info)
        copied.series = {name: series.copy() for name, series in self.series.items()}
        copied.alpha_counts, copied._alpha_sorted = list(self.alpha_counts), []
        copied.latest, copied.latest_step = dict(self.latest), dict(self.latest_step)
        copied.evals, copied.alerts, copied.nonfinite = list(self.evals), dict(self.alerts), dict(self.nonfinite)
        if clock is not None and self.status == "running":
            copied.clock = clock
        return copied

    # -- reading helpers -------------------------------------------------------------------

    def get(self, name: str) -> Series:
        """The history of ``name`` (empty if never recorded)."""
        return self.series.get(name) or Series()

    def alert_list(self) -> list[Alert]:
        """Alerts, most severe first, then newest first."""
        alerts = list(self.alerts.values())[::-1]
        return sorted(alerts, key=lambda alert: -SEVERITIES.index(alert[0]))

    @property
    def elapsed(self) -> float:
        return self.clock if self.clock is not None else self.time

    # -- internals -------------------------------------------------------------------------

    def _append(self, name: str, step: int, value: float) -> None:
        series = self.series.get(name)
        if series is None:
            series = self.series[name] = Series()
        series.append(step, value)

    def _track_loss(self, step: int, loss: float) -> None:
        ema = self.get("loss_ema")
        count = len(ema) + 1
        self._ema = self._ema * EMA_BETA + (1 - EMA_BETA) * loss
        smoothed = self._ema / (1 - EMA_BETA**count)
        self._append("loss_ema", step, smoothed)
        if count <= 5:
            self.loss_start = smoothed
            return
        start = self.loss_start or 0.0
        rise = (smoothed - start) / max(abs(start), 1e-8)
        if rise > 1.0 and "loss:rising" not in self.alerts:
            self.add_alert("warning", f"loss rose far above its start: {smoothed:.3g} vs {start:.3g} (step {step})", key="loss:rising")
        if rise > 10.0 and "loss:exploding" not in self.alerts:
            self.add_alert("critical", f"loss exploding: {smoothed:.3g} vs {start:.3g} at the start (step {step})", key="loss:exploding")
