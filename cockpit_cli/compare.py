"""``cockpit compare RUN1 RUN2 ...``: what differs between runs, how each ended, which did better.

:func:`compare_runs` returns a :class:`Comparison` (plain data);
:mod:`cockpit_cli.compare_render` presents it as Rich text or versioned JSON and holds the
command. Runs of different problems are compared as far as they can be, with a note.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cockpit_cli.diagnosis.windows import Series
from cockpit_cli.errors import CockpitError, did_you_mean
from cockpit_cli.recent import RECENT_MIN, RECENT_SHARE
from cockpit_cli.report.data import SPLITS, RunView, eval_metric, eval_metric_names
from cockpit_cli.storage import schema
from cockpit_cli.storage.reader import RunData, read_run

COMPARE_SCHEMA_VERSION = 1
IGNORED_KEYS = frozenset({"output.name"})
UNSET = "(unset)"
FINDINGS_SHOWN = 3
DEFAULT_RANKING = ("valid.accuracy", "valid.loss")
Findings = Callable[[RunData], list[dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    """One compared value per run.

    Attributes:
        key: Machine name, e.g. ``"valid.accuracy.best"``.
        label: What the row shows, for people.
        values: One value per run (``None``: the run has none).
        kind: How to format: ``number``, ``percent``, ``seconds``, ``integer``, ``text``, ``trend``
            (a ``[first, last]`` pair).
        better: ``"higher"`` or ``"lower"`` when one value is best, else ``None``.
    """

    key: str
    label: str
    values: list[Any]
    kind: str = "number"
    better: str | None = None


@dataclass(frozen=True)
class Ranking:
    """Which run did better on ``metric`` (its best value over the evaluations)."""

    metric: str
    direction: str
    values: list[float | None]
    winner: int | None


@dataclass
class Comparison:
    """Everything ``compare`` shows, as plain data."""

    runs: list[dict[str, Any]]
    config_differences: dict[str, list[Any]]
    outcomes: list[Row]
    instruments: list[Row]
    ranking: Ranking | None
    findings: list[list[dict[str, Any]]] | None = None
    notes: list[str] = field(default_factory=list)


def _expand(paths: Sequence[Path | str]) -> list[tuple[Path, bool]]:
    """Each run directory named by ``paths`` (run directories, parents of runs, or glob
    patterns) and whether it was named itself (not found in a parent or by a pattern)."""
    found: list[tuple[Path, bool]] = []
    for item in paths:
        path = Path(item)
        if any(char in str(item) for char in "*?[") and not path.exists():
            matches = [Path(match) for match in sorted(glob.glob(str(item)))]
            runs = [match for match in matches if (match / schema.MANIFEST).exists()]
            if not runs:
                raise CockpitError(f"the pattern '{item}' matches no run directory", "check the pattern, or pass the run directories")
            found.extend((run, False) for run in runs)
        elif path.is_dir() and not (path / schema.MANIFEST).exists():
            runs = sorted(child for child in path.iterdir() if (child / schema.MANIFEST).exists())
            if not runs:
                raise CockpitError(f"{path} is not a run directory and holds none", "pass run directories written by `cockpit run`, or their parent")
            found.extend((run, False) for run in runs)
        else:
            found.append((path, True))
    return found


def load_runs(paths: Sequence[Path | str]) -> tuple[list[RunData], list[str]]:
    """Read every run named by ``paths`` (run directories, parents of runs, or glob patterns,
    each run once); at least two are needed.

    A run found in a parent directory or by a pattern that cannot be read is left out, with a
    note saying why; one named itself is an error.

    Returns:
        The runs and the notes on the runs left out.
    """
    found = _expand(paths)
    runs, skipped, named = [], [], {path for path, itself in found if itself}
    for path in dict.fromkeys(path for path, _ in found):
        try:
            runs.append(read_run(path))
        except CockpitError as error:
            if path in named:
                raise
            skipped.append(f"left out a run that cannot be read: {error.message}")
    if len(runs) < 2:
        only = f": only {runs[0].path}" if runs else ""
        left_out = f" ({len(skipped)} more cannot be read: {'; '.join(skipped)})" if skipped else ""
        raise CockpitError(f"compare needs at least two runs{only}{left_out}", "pass two or more run directories, or a directory holding several runs")
    return runs, skipped


def check_metrics(metrics: Sequence[str], views: Sequence[RunView]) -> None:
    """Raise a :class:`CockpitError` for a metric that is neither an evaluation metric nor a tracked scalar."""
    tracked = sorted(set().union(*(view.tracked() for view in views)))
    for name in metrics:
        if eval_metric(name):
            continue
        if "." in name or name not in tracked:
            known = eval_metric_names() + tracked
            where = "is not an evaluation metric" if "." in name else "is tracked by none of the runs"
            raise CockpitError(f"metric '{name}' {where}{did_you_mean(name, known)}", f"use a quantity the runs tracked ({', '.join(tracked) or 'none'}) or one of {', '.join(eval_metric_names())}")
        if not any(len(view.quantity(name)) for view in views):
            raise CockpitError(f"metric '{name}' is not a scalar quantity", "--metric takes a scalar quantity such as NormTest, or an evaluation metric such as valid.loss")


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1}``: an empty section sets nothing (a run with
    ``instruments.quantities: {}`` and one with settings for a quantity differ in those settings)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_settings(run: RunData) -> dict[str, Any]:
    """The run's config keys, flattened; a run of the Python API, whose config cannot know its
    batch size, takes it from its manifest (learnt at its first step)."""
    flat = flatten(run.config)
    if schema.from_api(run.manifest) and flat.get("problem.batch_size") is None and run.manifest.get("batch_size"):
        flat["problem.batch_size"] = run.manifest["batch_size"]
    return flat


def config_differences(runs: Sequence[RunData]) -> dict[str, list[Any]]:
    """The config keys whose values differ between the runs (``output.name`` ignored)."""
    flat = [run_settings(run) for run in runs]
    keys = sorted(set().union(*flat) - IGNORED_KEYS)
    values = {key: [config.get(key, UNSET) for config in flat] for key in keys}
    return {key: row for key, row in values.items() if any(value != row[0] for value in row)}


def _last(series: Series) -> float | None:
    return float(series.values[-1]) if len(series) else None


def _best(series: Series, better: str) -> float | None:
    finite = [value for value in series.values if value is not None and math.isfinite(value)]
    return (max(finite) if better == "higher" else min(finite)) if finite else None


def outcome_rows(views: Sequence[RunView]) -> list[Row]:
    """Status, steps, wall time (also per step), and the final and best loss and accuracy of every split."""
    steps = [view.run.manifest.get("steps_completed", len(view.run.steps)) for view in views]
    seconds = [(view.run.summary or {}).get("wall_seconds", (view.run.manifest.get("timings") or {}).get("train_seconds")) for view in views]
    rows = [
        Row("status", "status", [view.run.status for view in views], "text"),
        Row("steps", "steps", steps, "integer"),
        Row("wall_seconds", "wall time", seconds, "seconds"),  # no best: runs of other lengths
        Row("seconds_per_step", "time per step", [_per_step(total, count) for total, count in zip(seconds, steps)], "seconds", "lower"),
    ]
    for split in SPLITS:
        for metric, better, kind in (("loss", "lower", "number"), ("accuracy", "higher", "percent")):
            series = [view.evaluation(split, metric) for view in views]
            for which, pick in (("final", _last), ("best", lambda s, b=better: _best(s, b))):
                values = [pick(item) for item in series]
                if any(value is not None for value in values):
                    rows.append(Row(f"{split}.{metric}.{which}", f"{split} {metric} ({which})", values, kind, better))
    return rows


def _per_step(seconds: Any, steps: Any) -> float | None:
    """Wall time per step (evaluations included), or ``None`` without both numbers."""
    if isinstance(seconds, (int, float)) and isinstance(steps, int) and steps > 0:
        return float(seconds) / steps
    return None


def _trend(series: Series) -> list[float] | None:
    return [float(series.values[0]), float(series.values[-1])] if len(series) else None


def _median(series: Series) -> float | None:
    return series.median() if len(series) else None


def _recent_median(series: Series) -> float | None:
    return _median(series.last(RECENT_SHARE, RECENT_MIN))


INSTRUMENT_ROWS: tuple[tuple[str, str, str, Callable[[Series], Any], str], ...] = (
    ("Alpha.median_last_10pct", "Alpha median (last 10%, at least 5)", "Alpha", _recent_median, "number"),
    ("grad_norm.final", "gradient norm (final)", "GradNorm", _last, "number"),
    ("NormTest.median", "NormTest median", "NormTest", _median, "number"),
    ("InnerTest.median", "InnerTest median", "InnerTest", _median, "number"),
    ("OrthoTest.median", "OrthoTest median", "OrthoTest", _median, "number"),
    ("HessMaxEV.trend", "HessMaxEV first → last", "HessMaxEV", _trend, "trend"),
    ("HessTrace.trend", "HessTrace first → last", "HessTrace", _trend, "trend"),
    ("TICDiag.median", "TICDiag median", "TICDiag", _median, "number"),
    ("Distance.final", "distance from init (final)", "Distance", _last, "number"),
    ("UpdateSize.median", "update size median", "UpdateSize", _median, "number"),
)


def instrument_rows(views: Sequence[RunView], metrics: Sequence[str] = ()) -> list[Row]:
    """Summaries of the instruments any run tracked (``None`` for runs that did not)."""
    specs = list(INSTRUMENT_ROWS)
    listed = {quantity for _, _, quantity, _, _ in specs}
    specs += [(f"{name}.final", f"{name} (final)", name, _last, "number") for name in metrics if not eval_metric(name) and name not in listed]
    rows = []
    for key, label, quantity, summarise, kind in specs:
        series = [view.grad_norm() if quantity == "GradNorm" else view.quantity(quantity) for view in views]
        values = [summarise(item) for item in series]
        if any(value is not None for value in values):
            rows.append(Row(key, label, values, kind))
    return rows


def rank(views: Sequence[RunView], metrics: Sequence[str] = ()) -> Ranking | None:
    """Which run has the best value of the first evaluation metric in ``metrics`` (default: valid accuracy, else loss)."""
    chosen = [name for name in metrics if eval_metric(name)][:1] or list(DEFAULT_RANKING)
    for name in chosen:
        direction = "higher" if name.endswith("accuracy") else "lower"
        values = [_best(view.metric(name), direction) for view in views]
        present = [(value, index) for index, value in enumerate(values) if value is not None]
        if present:
            best = (max if direction == "higher" else min)(present, key=lambda pair: pair[0])
            winner = best[1] if len(present) > 1 else None
            return Ranking(name, direction, values, winner)
    return None


def _notes(views: Sequence[RunView], ranking: Ranking | None) -> list[str]:
    """What the reader of a comparison should know: different problems, nothing in common, ..."""
    notes = []
    problems = {view.run.manifest.get("problem") for view in views}
    if len(problems) > 1:
        listed = ", ".join(f"{view.run.name}: {view.run.manifest.get('problem')}" for view in views)
        notes.append(f"the runs train different problems ({listed}); their losses and accuracies measure different tasks")
    tracked = [view.tracked() for view in views]
    if any(tracked) and not set.intersection(*tracked):
        notes.append("the runs track no instrument quantity in common: instrument rows show '-' for runs without it")
    if ranking is None:
        notes.append("no run has a valid accuracy or loss: no run can be called better")
    elif ranking.winner is None:
        notes.append(f"only one run has {ranking.metric}: no run can be called better on it")
    else:
        ties = [i for i, value in enumerate(ranking.values) if value == ranking.values[ranking.winner] and i != ranking.winner]
        if ties:
            notes.append(f"{', '.join(views[i].run.name for i in ties)} tie with {views[ranking.winner].run.name} on {ranking.metric}")
    for view in views:
        if view.run.status != "completed":
            notes.append(f"{view.run.name} is {view.run.status}: its numbers are those recorded so far")
        notes.extend(f"{view.run.name}: {note}" for note in view.run.notes)
    return notes


def compare_loaded(runs: Sequence[RunData], metrics: Sequence[str] = (), findings: Findings | None = None, skipped: Sequence[str] = ()) -> Comparison:
    """Compare runs already read from their directories (see :func:`compare_runs`); ``skipped``
    are notes on runs that could not be read."""
    views = [RunView(run) for run in runs]
    check_metrics(metrics, views)
    names = [run.name for run in runs]
    duplicate = len(set(names)) < len(names)
    ranking = rank(views, metrics)
    return Comparison(
        runs=[
            {"name": f"{run.path.parent.name}/{run.name}" if duplicate else run.name, "path": str(run.path), "problem": run.manifest.get("problem"), "optimizer": run.manifest.get("optimizer"), "status": run.status}
            for run in runs
        ],
        config_differences=config_differences(runs),
        outcomes=outcome_rows(views),
        instruments=instrument_rows(views, metrics),
        ranking=ranking,
        findings=[findings(run)[:FINDINGS_SHOWN] for run in runs] if findings is not None else None,
        notes=[*skipped, *_notes(views, ranking)],
    )


def compare_runs(paths: list[Path], metrics: list[str], findings: Findings | None = None) -> Comparison:
    """Compare the runs named by ``paths`` (run directories, their parents, or glob patterns).

    Args:
        paths: At least two runs in all.
        metrics: Extra metrics: scalar quantities (``NormTest``) get an instrument row; the first
            evaluation metric (``valid.loss``) decides which run is better.
        findings: Returns a run's diagnosis findings as dicts (``rule``, ``severity``, ``meaning``,
            ...), most important first; ``None`` leaves them out.

    Raises:
        CockpitError: A path is not a run directory, fewer than two runs, or an unknown metric.
    """
    runs, skipped = load_runs(paths)
    return compare_loaded(runs, metrics, findings, skipped)
