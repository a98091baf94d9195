"""What the figures and ``compare`` read from a run: series over an optional range of steps.

:class:`RunView` wraps :class:`~cockpit_cli.diagnosis.series.RunSeries` (which extracts the
series from the records) and adds what plotting needs on top: a step range every series is
clipped to, one number per step for per-parameter quantities, per-layer statistics, the
per-sample outcomes of the evaluations, and a sentence saying why a panel has no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cockpit_cli.diagnosis.engine import ENABLED_BY_PRESET
from cockpit_cli.diagnosis.series import RunSeries, as_floats
from cockpit_cli.diagnosis.windows import Series
from cockpit_cli.errors import CockpitError
from cockpit_cli.storage.reader import RunData
from cockpit_cli.storage.totals import quantity_total

# Per-parameter quantities whose total over the parameters is a sum (the rest: a Euclidean norm).
SPLITS = ("train_eval", "valid", "test")
EVAL_METRICS = ("loss", "accuracy")


def _update_norms(sizes: list[float], ratios: list[float], weights: list[float]) -> list[float | None]:
    """Each parameter's ``||theta_{t+1} - theta_t||``: UpdateSize's value (``sizes``) where there is
    one, else ``ratio * ||theta_t||`` (0 for a ratio of 0); ``None`` where neither gives it."""
    norms: list[float | None] = []
    for index in range(max(len(sizes), min(len(ratios), len(weights)))):
        ratio, weight = (ratios[index], weights[index]) if index < min(len(ratios), len(weights)) else (math.nan, math.nan)
        if index < len(sizes) and math.isfinite(sizes[index]):
            norms.append(sizes[index])
        elif ratio == 0:
            norms.append(0.0)
        elif weight > 0 and math.isfinite(ratio):
            norms.append(ratio * weight)
        else:
            norms.append(None)  # a parameter at zero that moved (ratio infinite), or nothing recorded
    return norms


def parse_step_range(text: str) -> tuple[int, int]:
    """Parse ``"A:B"`` or ``"A-B"`` (two step numbers, ``A < B``; ``cockpit diagnose`` writes
    ``steps 640-1216``) into ``(A, B)``.

    Raises:
        CockpitError: ``text`` is not two non-negative integers separated by a colon or a
            hyphen, or ``A >= B``.
    """
    hint = "give the first and last step as A:B, e.g. --step-range 100:500"
    parts = text.strip().split(":") if ":" in text else text.strip().split("-")
    if len(parts) != 2:
        raise CockpitError(f"step range '{text}' is not of the form A:B", hint)
    bounds = []
    for part in parts:
        if not part.strip().isdigit():
            raise CockpitError(f"step range '{text}': '{part}' is not a step number (a non-negative integer)", hint)
        bounds.append(int(part))
    if bounds[0] >= bounds[1]:
        raise CockpitError(f"step range '{text}': the start ({bounds[0]}) must be smaller than the end ({bounds[1]})", hint)
    return bounds[0], bounds[1]


def eval_metric(name: str) -> tuple[str, str] | None:
    """``("valid", "loss")`` for ``"valid.loss"``; ``None`` when ``name`` is no evaluation metric."""
    split, dot, metric = name.partition(".")
    return (split, metric) if dot and split in SPLITS and metric in EVAL_METRICS else None


def eval_metric_names() -> list[str]:
    """Every evaluation metric name: ``train_eval.loss``, ..., ``test.accuracy``."""
    return [f"{split}.{metric}" for split in SPLITS for metric in EVAL_METRICS]


def clip(series: Series, step_range: tuple[int, int] | None) -> Series:
    """The points of ``series`` whose step lies in ``step_range`` (both ends included)."""
    if step_range is None:
        return series
    low, high = step_range
    pairs = [(step, value) for step, value in zip(series.steps, series.values) if low <= step <= high]
    return Series([step for step, _ in pairs], [value for _, value in pairs])


@dataclass
class SampleOutcomes:
    """Per-sample outcomes of the tracked validation samples.

    Attributes:
        steps: The step of each evaluation (columns).
        rows: One string per sample, one character per evaluation: ``1`` correct, ``0`` wrong,
            ``?`` not evaluated.
    """

    steps: list[int]
    rows: list[str]


@dataclass
class RunView:
    """A run's series, clipped to ``step_range``.

    Args:
        run: The run as read from its directory.
        step_range: First and last step to show (``None``: all).
    """

    run: RunData
    step_range: tuple[int, int] | None = None
    series: RunSeries = field(init=False)

    def __post_init__(self) -> None:
        self.series = RunSeries(self.run.manifest, self.run.steps, self.run.evals, self.run.config)

    @property
    def optimizer(self) -> str:
        return self.series.optimizer() or "unknown optimizer"

    def run_span(self) -> tuple[int, int]:
        """First and last step the run recorded (steps and evaluations)."""
        steps = [int(record.get("step", 0)) for record in (self.run.steps[:1] + self.run.steps[-1:] + self.run.evals[-1:])]
        return (min(steps, default=0), max(steps + [1]))

    def step_span(self) -> tuple[int, int]:
        """First and last step shown: the run's steps, within the step range when there is one."""
        first, last = self.run_span()
        if self.step_range is None:
            return first, last
        low, high = max(self.step_range[0], first), min(self.step_range[1], last)
        return (low, high) if low < high else self.step_range

    def check_range(self) -> None:
        """Raise a :class:`CockpitError` when the step range holds none of the run's steps."""
        if self.step_range is None:
            return
        first, last = self.run_span()
        low, high = self.step_range
        if high < first or low > last:
            raise CockpitError(f"step range {low}:{high} lies outside the run's steps ({first} to {last})", f"choose a range within {first}:{last}")

    def quantity(self, name: str) -> Series:
        """One number per tracked step of quantity ``name`` (see :func:`total`)."""
        return Series(*_finite(self.raw(name), lambda value: quantity_total(name, value)))

    def metric(self, name: str) -> Series:
        """An evaluation metric (``"valid.loss"``) or a quantity (``"NormTest"``) as one number per step."""
        parsed = eval_metric(name)
        return self.evaluation(*parsed) if parsed else self.quantity(name)

    def tracked(self) -> set[str]:
        """Names of the quantities the run declares or has recorded."""
        names = set((self.run.manifest.get("instruments") or {}).get("quantities") or {})
        for record in self.run.steps:
            names.update(record.get("quantities") or {})
        return names

    def raw(self, name: str) -> Series:
        """The stored values of quantity ``name`` (any JSON type)."""
        return clip(self.series.raw(name), self.step_range)

    def grad_norm(self) -> Series:
        """The total gradient norm (from GradNorm, else from LayerStats)."""
        return clip(self.series.total_norm("grad_norm"), self.step_range)

    def loss(self) -> Series:
        """The mini-batch loss of every step."""
        return clip(self.series.loss(), self.step_range)

    def lr(self) -> Series:
        """The learning rate (largest over the parameter groups) of every step."""
        return clip(self.series.lr(), self.step_range)

    def evaluation(self, split: str, metric: str) -> Series:
        """``metric`` (``loss`` or ``accuracy``) on ``split`` at every evaluation."""
        return clip(self.series.evaluation(split, metric), self.step_range)

    def layer_stats(self) -> dict[str, dict[str, Series]]:
        """Per layer: ``grad_norm``, ``weight_norm`` and ``update_ratio`` of the whole layer over time.

        A layer is a parameter-name prefix (``"3"`` for ``"3.weight"`` and ``"3.bias"``); its norms
        combine its parameters' norms, and its ratio is ``||update|| / ||weights||`` of the layer.
        A parameter's update norm is UpdateSize's where the step has it, else its ratio times its
        weight norm, which a parameter at zero (a bias initialised to 0: ratio infinite) lacks:
        the layer then has no ratio at that step.
        """
        layers = self.series.layers()
        result: dict[str, dict[str, list[tuple[int, float]]]] = {name: {"grad_norm": [], "weight_norm": [], "update_ratio": []} for name in layers}
        stats = self.raw("LayerStats")
        update_sizes = self.raw("UpdateSize")
        sizes_at = {step: as_floats(value) or [] for step, value in zip(update_sizes.steps, update_sizes.values)}
        for step, value in zip(stats.steps, stats.values):
            if not isinstance(value, dict):
                continue
            columns = {key: as_floats(value.get(key)) or [] for key in ("grad_norm", "weight_norm", "update_ratio")}
            updates = _update_norms(sizes_at.get(step, []), columns["update_ratio"], columns["weight_norm"])
            for layer, indices in layers.items():
                picked = {key: [values[i] for i in indices if i < len(values)] for key, values in columns.items()}
                weights = math.sqrt(math.fsum(w * w for w in picked["weight_norm"]))
                if picked["grad_norm"]:
                    result[layer]["grad_norm"].append((step, math.sqrt(math.fsum(g * g for g in picked["grad_norm"]))))
                if picked["weight_norm"]:
                    result[layer]["weight_norm"].append((step, weights))
                layer_updates = [updates[i] if i < len(updates) else None for i in indices]
                if weights > 0 and None not in layer_updates:
                    update = math.sqrt(math.fsum(u * u for u in layer_updates))
                    result[layer]["update_ratio"].append((step, update / weights))
        return {layer: {key: Series([s for s, _ in pairs], [v for _, v in pairs]) for key, pairs in kinds.items()} for layer, kinds in result.items()}

    def layer_histograms(self) -> tuple[list[int], dict[str, list[list[int]]], tuple[float, float] | None] | None:
        """Per-layer gradient histograms over time from GradHist1d's ``per_parameter`` counts.

        Returns:
            The tracked steps, per layer one summed count vector per step, and the value range
            (``None`` when it changes between steps, as with ``adaptive: true``); ``None`` when no
            histogram with per-parameter counts was recorded.
        """
        layers, hists = self.series.layers(), self.raw("GradHist1d")
        steps: list[int] = []
        counts: dict[str, list[list[int]]] = {layer: [] for layer in layers}
        ranges: set[tuple[float, float]] = set()
        for step, value in zip(hists.steps, hists.values):
            per_parameter = value.get("per_parameter") if isinstance(value, dict) else None
            if not per_parameter:
                continue
            ranges.add(tuple(value.get("range") or (-2.0, 2.0)))  # type: ignore[arg-type]
            steps.append(step)
            for layer, indices in layers.items():
                rows = [per_parameter[i] for i in indices if i < len(per_parameter)]
                counts[layer].append([sum(column) for column in zip(*rows)] if rows else [])
        return (steps, counts, ranges.pop() if len(ranges) == 1 else None) if steps else None

    def samples(self) -> SampleOutcomes:
        """The per-sample outcomes of the evaluations in the step range that recorded them."""
        evals = [(int(record.get("step", 0)), record.get("samples")) for record in self.run.evals]
        evals = [(step, text) for step, text in evals if isinstance(text, str) and text]
        if self.step_range is not None:
            evals = [(step, text) for step, text in evals if self.step_range[0] <= step <= self.step_range[1]]
        if not evals:
            return SampleOutcomes([], [])
        width = max(len(text) for _, text in evals)
        columns = [text.ljust(width, "?") for _, text in evals]
        return SampleOutcomes([step for step, _ in evals], ["".join(row) for row in zip(*columns)])

    def why_empty(self, name: str) -> str:
        """Why quantity ``name`` has no data here, and how to get it."""
        instruments = self.run.manifest.get("instruments") or {}
        unavailable = instruments.get("unavailable") or {}
        if name in unavailable:
            return f"{name} unavailable: {unavailable[name]}"
        if name in (instruments.get("quantities") or {}) or self.series.count(name):
            span = f" in steps {self.step_range[0]}-{self.step_range[1]}" if self.step_range else " yet"
            return f"{name}: no data{span}"
        preset = ENABLED_BY_PRESET.get(name)
        how = f"use preset {preset}" if preset else f"set instruments.quantities.{name}: true"
        return f"{name} not tracked: {how}"


def _finite(series: Series, convert: Any) -> tuple[list[int], list[float]]:
    """Steps and converted values of ``series`` where the conversion gives a number."""
    pairs = [(step, convert(value)) for step, value in zip(series.steps, series.values)]
    kept = [(step, value) for step, value in pairs if value is not None]
    return [step for step, _ in kept], [value for _, value in kept]
