"""Overfitting: the validation loss rises while the training loss keeps falling."""

from __future__ import annotations

from cockpit_cli.diagnosis.finding import Evidence, Finding, context
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.diagnosis.windows import finite_median

RISE = 0.2  # smoothed validation loss at the end above its smoothed minimum by this fraction
GAP = 0.15  # train_eval accuracy above valid accuracy at the end by this much (and growing)


def smooth(values: list[float]) -> list[float]:
    """Running medians over up to 3 evaluations (fewer for short runs), so one noisy evaluation does not count."""
    width = max(1, min(3, len(values) // 3))
    return [finite_median(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def paired(run: RunSeries, metric: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, train_eval and valid values of ``metric`` at the evaluations that have both."""
    train, valid = run.evaluation("train_eval", metric), run.evaluation("valid", metric)
    train_at = dict(zip(train.steps, train.values))
    steps = [step for step in valid.steps if step in train_at]
    valid_at = dict(zip(valid.steps, valid.values))
    return steps, [train_at[step] for step in steps], [valid_at[step] for step in steps]


class Overfitting(Rule):
    name = "overfitting"
    priority = 70
    requires = ("evals",)
    min_points = 4
    source = "UMLAUT (validation loss rises while training loss falls; train/valid accuracy gap)"
    meaning = "The model fits the training data ever better but generalises worse: it memorises rather than learns."
    hint = "stop earlier (at the best validation step), use more training data, data augmentation, weight decay or a smaller model"

    def check(self, run: RunSeries) -> Finding | None:
        evidence, span = [], None
        steps, train, valid = paired(run, "loss")
        if len(steps) >= self.min_points:
            train, valid = smooth(train), smooth(valid)
            best = min(range(len(valid)), key=lambda i: valid[i] if valid[i] == valid[i] else float("inf"))
            rise = valid[-1] / valid[best] - 1 if valid[best] > 0 else 0.0
            if rise > RISE and train[-1] < train[best]:
                evidence.append(Evidence(f"smoothed validation loss rise since its minimum at step {steps[best]}", rise, RISE, ">"))
                evidence.append(context("smoothed train_eval loss then -> now", f"{train[best]:.4g} -> {train[-1]:.4g}"))
                span = (steps[best], steps[-1])
        steps, train, valid = paired(run, "accuracy")
        gaps = smooth([t - v for t, v in zip(train, valid)])
        if len(gaps) >= 2 and gaps[-1] > GAP and gaps[-1] > gaps[0]:
            evidence.append(Evidence("smoothed train_eval accuracy - valid accuracy at the end", gaps[-1], GAP, ">"))
            span = span or (steps[0], steps[-1])
        return self.report(span, evidence) if span else None
