"""Diagnosis rules, engine, live episodes, rendering and the command, on hand-built runs (no torch)."""

from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from rich.console import Console

from cockpit_cli.diagnosis import RULES, LiveDiagnosis, diagnose
from cockpit_cli.diagnosis.command import run_diagnose
from cockpit_cli.diagnosis.finding import Finding
from cockpit_cli.diagnosis.render import diagnosis_to_dict, render_text
from cockpit_cli.diagnosis.rules import register
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.diagnosis.windows import Series, Table, finite_median
from cockpit_cli.errors import CockpitError
from cockpit_cli.storage.reader import RunData

PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
Change = Callable[[int, dict[str, Any], random.Random], None]


def _histogram(peak: float = 0.6) -> list[int]:
    rest = [max(1, int(1000 * math.exp(-abs(i - 50) / 3))) for i in range(100)]
    rest[50] = int(peak / (1 - peak) * (sum(rest) - rest[50]))
    return rest


def healthy_quantities(step: int, rng: random.Random) -> dict[str, Any]:
    """Quantities shaped like those of a healthy MNIST-1D MLP run (see configs/failures/healthy_mlp.yaml)."""
    grad = [0.5 + 0.2 * rng.random() for _ in PARAMS]
    return {
        "Alpha": rng.gauss(0.15, 0.3),
        "GradNorm": grad,
        "UpdateSize": [0.05 * g for g in grad],
        "NormTest": 0.8 + 0.1 * rng.random(),
        "GradHist1d": {"counts": _histogram(), "range": [-2.0, 2.0], "per_parameter": [_histogram() for _ in PARAMS]},
        "LayerStats": {"weight_norm": [3.0] * 6, "grad_norm": grad, "update_ratio": [0.015] * 6, "zero_grad_fraction": [0.01] * 6},
        "Activations": {name: {"mean": 0.1, "std": 0.5, "zero_fraction": 0.55 * (int(name) % 2)} for name in "01234"},
        "InputStats": {"mean": 0.0, "std": 1.0, "min": -3.9, "max": 3.9},
    }


def train_loss(step: int, steps: int = 200) -> float:
    """The synthetic runs' training loss at ``step`` (without noise)."""
    return 2.0 * math.exp(-3 * step / steps) + 0.3


def make_run(
    steps: int = 200,
    change: Change | None = None,
    loss: Callable[[int], float] | None = None,
    status: str = "completed",
    valid_loss: Callable[[int], float] | None = None,
    train_eval_loss: Callable[[int], float] | None = None,
    drop: tuple[str, ...] = (),
    unavailable: dict[str, str] | None = None,
    lr: float = 0.1,
    optimizer: str = "SGD",
) -> RunData:
    """A run of ``steps`` tracked steps, healthy unless ``change`` edits the quantities of a step."""
    rng = random.Random(0)
    records = []
    for step in range(steps):
        quantities = healthy_quantities(step, rng)
        if change is not None:
            change(step, quantities, rng)
        for name in drop:
            quantities.pop(name, None)
        value = loss(step) if loss else train_loss(step, steps) + 0.05 * rng.random()
        records.append({"step": step, "epoch": step // 50, "loss": value, "lr": [lr], "time": 0.1 * step, "quantities": quantities})
    evals = []
    for step in range(0, steps + 1, 25):
        train = train_eval_loss(step) if train_eval_loss else train_loss(step, steps)
        valid = valid_loss(step) if valid_loss else train + 0.05
        splits = {"train_eval": {"loss": train, "accuracy": 1 - train / 2.3}, "valid": {"loss": valid, "accuracy": 1 - valid / 2.3}}
        evals.append({"step": step, "epoch": step // 50, "time": 0.1 * step, "splits": splits})
    manifest = {
        "schema_version": 1, "status": status, "problem": "mnist1d_mlp", "optimizer": optimizer, "batch_size": 100,
        "instruments": {"parameters": PARAMS, "unavailable": unavailable or {}},
    }
    config = {"optimizer": {"name": optimizer, "lr": lr, "momentum": 0.9}}
    return RunData(path=Path("synthetic"), manifest=manifest, config=config, steps=records, evals=evals, summary=None)


def rules_found(run: RunData) -> list[str]:
    return [finding.rule for finding in diagnose(run).findings]


def test_healthy_run_has_no_findings():
    diagnosis = diagnose(make_run())
    assert diagnosis.findings == []
    assert diagnosis.healthy() and diagnosis.worst() is None
    assert [item.rule for item in diagnosis.not_checked] == ["early_stopping"]


def _set(name: str, value: Callable[[int, random.Random], Any]) -> Change:
    return lambda step, q, rng: q.__setitem__(name, value(step, rng))


def _layer_scale(first: float) -> Change:
    def change(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["GradNorm"][0] *= first
        q["GradNorm"][1] *= first

    return change


def _dead(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["LayerStats"]["zero_grad_fraction"][2] = 0.95
    q["Activations"]["3"]["zero_fraction"] = 0.99


def _frozen(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["UpdateSize"][2] = 0.0


def _collapsed(step: int, q: dict[str, Any], rng: random.Random) -> None:
    _layer_scale(5e-3)(step, q, rng)
    _collapsed_histogram(step, q, rng)


def _collapsed_histogram(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["GradHist1d"]["per_parameter"][0] = [0] * 50 + [10_000] + [0] * 49


def _no_gradient(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["GradNorm"][0] = q["GradNorm"][1] = 0.0


def _dead_outputs(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["Activations"]["3"]["zero_fraction"] = 0.99


def _briefly(name: str, value: float, otherwise: float, share: float) -> Change:
    return _set(name, lambda s, rng: value if rng.random() < share else otherwise)


CASES: dict[str, dict[str, Any]] = {
    "divergence/nan loss": {"expect": "divergence", "loss": lambda s: math.nan if s >= 150 else 2.0},
    "divergence/status": {"expect": "divergence", "status": "diverged"},
    "divergence/loss growth": {"expect": "divergence", "loss": lambda s: 2.0 * math.exp(s / 40)},
    "divergence/loss above 1e3": {"expect": "divergence", "loss": lambda s: 200.0 if s < 100 else 1500.0},  # 7.5x, not 10x
    "divergence/blown up at the second step": {"expect": "divergence", "loss": lambda s: 1.6 if s == 0 else 1e5 * (1 + 0.5 * math.sin(s))},
    "lr_too_large/alpha": {"expect": "lr_too_large", "change": _set("Alpha", lambda s, rng: rng.gauss(0.8, 0.15))},
    "lr_too_large/sharpness": {"expect": "lr_too_large", "change": _set("HessMaxEV", lambda s, rng: 50.0)},
    "lr_too_small": {"expect": "lr_too_small", "change": _set("Alpha", lambda s, rng: -0.99)},
    "exploding/growth": {"expect": "exploding_gradients", "change": _set("GradNorm", lambda s, rng: [0.5 * 10 ** (s / 40)] * 6)},
    "exploding/layer ratio": {"expect": "exploding_gradients", "change": _layer_scale(200.0)},
    "vanishing/layer ratio": {"expect": "vanishing_gradients", "change": _layer_scale(1e-5)},
    "vanishing/collapsed histogram": {"expect": "vanishing_gradients", "change": _collapsed},
    "dead_units": {"expect": "dead_units", "change": _dead},
    "dead_units/activations": {"expect": "dead_units", "change": _dead_outputs},
    "misscaled_inputs": {"expect": "misscaled_inputs", "change": _set("InputStats", lambda s, rng: {"mean": 0.5, "std": 255.0, "min": -990.0, "max": 990.0})},
    "gradient_noise": {"expect": "gradient_noise", "change": _set("NormTest", lambda s, rng: 0.96 + 0.04 * rng.random()), "loss": lambda s: 2.3 - s / 1000},
    "stalled_training": {"expect": "stalled_training", "loss": lambda s: 2.3 + 0.01 * math.sin(s)},
    "overfitting": {"expect": "overfitting", "valid_loss": lambda s: 1.0 + abs(s - 50) / 100},
    "overfitting/accuracy gap": {"expect": "overfitting", "valid_loss": lambda s: train_loss(s) + s / 400},
    "early_stopping": {"expect": "early_stopping", "change": _set("EarlyStopping", lambda s, rng: 0.3)},
    "frozen_parameters": {"expect": "frozen_parameters", "change": _frozen},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule_names_its_failure_first(case: str):
    options = dict(CASES[case])
    expect = options.pop("expect")
    diagnosis = diagnose(make_run(**options))
    assert diagnosis.findings, case
    top = diagnosis.findings[0]
    assert top.rule == expect
    assert top.evidence and all(item.metric for item in top.evidence)
    assert top.meaning and top.hint and top.steps[0] <= top.steps[1]


@pytest.mark.parametrize(
    "options",
    [
        {"change": _set("Alpha", lambda s, rng: rng.gauss(0.4, 0.3))},  # overshooting a little is fine
        {"change": _set("Alpha", lambda s, rng: -0.8)},
        {"change": _set("NormTest", lambda s, rng: 0.9)},
        {"change": _set("NormTest", lambda s, rng: 1.0)},  # noise dominates near a minimum: expected
        {"change": _set("HessMaxEV", lambda s, rng: 30.0)},  # lr * lambda = 3 < 2 (1 + 0.9)
        {"change": _layer_scale(30.0)},
        {"change": _layer_scale(3e-3)},
        {"change": _set("InputStats", lambda s, rng: {"mean": 0.13, "std": 0.31, "min": 0.0, "max": 1.0})},  # MNIST in [0, 1]
        {"valid_loss": lambda s: train_loss(s) + 0.05 + max(0, s - 150) / 2000},  # a small rise is noise
        # validation loss rising with the training loss: not overfitting
        {"valid_loss": lambda s: 1.0 + abs(s - 50) / 100, "train_eval_loss": lambda s: 0.95 + abs(s - 50) / 100},
        {"valid_loss": lambda s: train_loss(s) + 0.45 - s / 2000},  # an accuracy gap above 0.15 that shrinks
        {"loss": lambda s: 2.3 - s / 200},  # slow but steady progress is not a stall
        {"change": _collapsed_histogram},  # a collapsed histogram counts only in a layer with a small gradient
        {"change": _set("GradNorm", lambda s, rng: [200.0 + rng.random()] * 6)},  # large but steady gradients
        {"change": _set("HessMaxEV", lambda s, rng: 50.0), "optimizer": "Adam"},  # lr * lambda bounds SGD's steps only
        {"change": _set("InputStats", lambda s, rng: {"mean": 0.0, "std": math.nan, "min": -1.0, "max": 1.0})},
    ],
)
def test_values_inside_thresholds_are_not_findings(options: dict[str, Any]):
    assert [rule for rule in rules_found(make_run(**options)) if RULES[rule].severity != "info"] == []


@pytest.mark.parametrize(("alpha", "quantity", "rule"), [(41.3, "Alpha", "lr_too_large"), (-0.99, "Alpha", "lr_too_small"), (0.9, "EarlyStopping", "early_stopping")])
def test_after_a_divergence_the_rules_read_the_finite_values_before_it(alpha: float, quantity: str, rule: str):
    """A run that went NaN at step 3 (kept going with on_nonfinite: continue) has two finite values:
    too few for a median (lr_too_large said 'median Alpha 41.3' of one value). With enough finite
    values before the divergence, the rule reads those."""
    def diverging(after: int) -> Change:
        def change(step: int, q: dict[str, Any], rng: random.Random) -> None:
            q[quantity] = alpha if step < after else math.nan
            q["GradNorm"] = q["GradNorm"] if step < after else [math.nan] * 6
        return change

    options = {"loss": lambda s: 2.0 if s < 3 else math.nan, "optimizer": "SGD"}
    found = rules_found(make_run(steps=40, change=diverging(3), **options))
    assert found[0] == "divergence" and rule not in found
    found = rules_found(make_run(steps=40, change=diverging(20), loss=lambda s: 2.0 if s < 20 else math.nan))
    assert found[0] == "divergence" and rule in found
    finding = next(finding for finding in diagnose(make_run(steps=40, change=diverging(20), loss=lambda s: 2.0 if s < 20 else math.nan)).findings if finding.rule == rule)
    assert finding.steps[1] < 20  # the finite stretch


def test_overshooting_only_late_in_a_constant_rate_asks_for_a_decaying_schedule():
    """The quick-start (constant rate 0.1) overshoots in its second half only; a 3-10x smaller
    rate made it worse (valid 92% and 80% against 95%), a cosine schedule better and healthy."""
    late = _set("Alpha", lambda step, rng: 0.1 if step < 100 else 0.8)
    (finding,) = [f for f in diagnose(make_run(change=late)).findings if f.rule == "lr_too_large"]
    assert finding.hint.startswith("add a decaying schedule") and "(median Alpha 0.1)" in finding.hint
    def late_and_sharp(step: int, q: dict[str, Any], rng: random.Random) -> None:
        late(step, q, rng)
        q["HessMaxEV"] = 50.0  # lr * lambda_max beyond the stability limit: the rate itself is too large

    for options in ({"change": _set("Alpha", lambda step, rng: 0.8)}, {"change": late, "lr_at": lambda step: 0.1 * 0.99**step}, {"change": late_and_sharp}):
        run = make_run(**{key: value for key, value in options.items() if key != "lr_at"})
        if "lr_at" in options:  # a rate that already decays
            for record in run.steps:
                record["lr"] = [options["lr_at"](record["step"])]
        (finding,) = [f for f in diagnose(run).findings if f.rule == "lr_too_large"]
        assert finding.hint == RULES["lr_too_large"].hint


def test_too_small_steps_near_the_stability_limit_say_how_far_the_rate_may_rise():
    """Rosenbrock at 0.001: Alpha near -1, but lr x HessMaxEV near 1 (968 at most); 2x did best, 3x
    worse and 5x diverged, where the general hint said '3-10x larger'."""
    def short(curvature: float) -> Change:
        def change(step: int, q: dict[str, Any], rng: random.Random) -> None:
            q["Alpha"], q["HessMaxEV"] = -0.99, curvature if step == 60 else curvature / 4
        return change

    def hint(curvature: float, optimizer: str = "SGD") -> str:
        (finding,) = [f for f in diagnose(make_run(change=short(curvature), lr=0.001, optimizer=optimizer)).findings if f.rule == "lr_too_small"]
        return finding.hint

    # momentum 0.9: the limit is 2 (1 + 0.9) / 900 = 0.0042
    assert hint(900.0).startswith("raise the learning rate, but to less than 0.0042 (4.2x), where lr x HessMaxEV reaches 3.8 at the largest eigenvalue seen (900, step 60)")
    general = RULES["lr_too_small"].hint
    assert hint(100.0) == general  # room for 38x: the general advice stands
    assert hint(9000.0) == general  # past the limit already: the curvature says nothing about how far to go
    assert hint(900.0, optimizer="Adam") == general


@pytest.mark.parametrize(
    "problem, training, advice",
    [
        ("mnist1d_mlp", {}, "clip gradients (training.clip_grad_norm)"),
        ("mnist1d_mlp", {"clip_grad_norm": 5.0}, "clip gradients harder (training.clip_grad_norm is 5 here)"),
        ("custom", {}, "clip gradients (torch.nn.utils.clip_grad_norm_ before optimizer.step())"),
    ],
)
def test_the_advice_to_clip_gradients_fits_the_run(problem: str, training: dict, advice: str):
    """The config key where the run has none, harder where it clips already, torch's function
    for a run of the Python API (which has no config key)."""
    run = make_run(loss=lambda s: math.nan if s >= 150 else 2.0)
    run.manifest["problem"] = problem
    run.config["training"] = training
    (finding,) = [finding for finding in diagnose(run).findings if finding.rule == "divergence"]
    assert finding.hint == "lower the learning rate (try 10x smaller), check the inputs' scale, or " + advice


def test_histograms_that_counted_nothing_after_a_divergence_are_left_out():
    """After a divergence every gradient element is NaN and the histograms count none: the share in
    the edge bins read nan; it is taken from the histograms before."""
    from cockpit_cli.diagnosis.values import share_in_edges

    def scaled_then_blown(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["InputStats"] = {"mean": 0.5, "std": 255.0, "min": 0.0, "max": 255.0}
        if step >= 100:
            q["GradHist1d"] = {"counts": [0] * 100, "range": [-2.0, 2.0], "per_parameter": [[0] * 100 for _ in PARAMS]}

    (finding,) = [f for f in diagnose(make_run(change=scaled_then_blown)).findings if f.rule == "misscaled_inputs"]
    (share,) = [e.value for e in finding.evidence if "clamped edge bins" in e.metric]
    assert share == pytest.approx(share_in_edges({"counts": _histogram()}))


def test_a_running_run_is_judged_stalled_only_after_30_percent_of_its_steps():
    """Live, the quick-start at lr 0.03 was told 'the model is not learning' at step 24 of 1280
    (its first steps sit on a plateau); a run still training is judged after 30% of its plan."""
    flat = lambda step: 2.3  # noqa: E731
    running = make_run(steps=100, loss=flat, status="running")
    running.manifest["total_steps"] = 1000
    diagnosis = diagnose(running)
    assert "stalled_training" not in rules_found(running)
    skipped = next(item for item in diagnosis.not_checked if item.rule == "stalled_training")
    assert (skipped.reason, skipped.too_few) == ("only 100 of 1000 planned steps so far (judged after 30% of them)", True)
    running.manifest["total_steps"] = 300
    assert "stalled_training" in rules_found(running)
    finished = make_run(steps=100, loss=flat, status="interrupted")
    finished.manifest["total_steps"] = 1000
    assert "stalled_training" in rules_found(finished)  # a run that ended is judged on what it did

    events = []
    live = LiveDiagnosis(on_alert=lambda finding: events.append(finding.rule), check_every=10, rules=[RULES["stalled_training"]], config={})
    live.on_start({"total_steps": 1000, "problem": "toy"})
    for step in range(100):
        live.on_step({"step": step, "epoch": 0, "loss": 2.3, "lr": [0.1], "time": 0.0, "quantities": {}})
    assert events == []
    for step in range(100, 300):
        live.on_step({"step": step, "epoch": 0, "loss": 2.3, "lr": [0.1], "time": 0.0, "quantities": {}})
    assert events == ["stalled_training"]


def test_findings_are_ordered_by_severity_then_root_cause():
    def everything(step: int, q: dict[str, Any], rng: random.Random) -> None:
        _dead(step, q, rng)
        q["InputStats"] = {"mean": 0.5, "std": 255.0, "min": -990.0, "max": 990.0}
        q["Alpha"] = 0.9

    found = rules_found(make_run(change=everything, loss=lambda s: math.nan if s > 190 else 2.0))
    assert found[:4] == ["divergence", "misscaled_inputs", "dead_units", "lr_too_large"]


def test_missing_data_is_listed_with_what_enables_it():
    diagnosis = diagnose(make_run(drop=("Alpha", "NormTest"), unavailable={"NormTest": "needs per-sample gradients"}))
    skipped = {item.rule: item for item in diagnosis.not_checked}
    assert skipped["lr_too_small"].reason == "needs Alpha"
    assert "preset economy" in skipped["lr_too_small"].enable
    assert skipped["lr_too_large"].reason == "needs Alpha or HessMaxEV"
    assert skipped["lr_too_large"].enable == "preset economy or higher, or instruments.quantities.Alpha: true"
    assert "per-sample gradients" in skipped["gradient_noise"].reason
    assert skipped["gradient_noise"].enable == "a run without that obstacle"  # tracking it more would not help
    assert (skipped["early_stopping"].reason, skipped["early_stopping"].enable) == (
        "needs EarlyStopping, defined for plain SGD only; this run uses SGD with momentum 0.9",
        "a run with plain SGD (no momentum, weight decay or Nesterov)",
    )
    assert "lr_too_small" not in diagnosis.checked
    plain = make_run()
    plain.config["optimizer"]["momentum"] = 0.0
    skipped = {item.rule: item for item in diagnose(plain).not_checked}
    assert (skipped["early_stopping"].reason, skipped["early_stopping"].enable) == ("needs EarlyStopping", "instruments.quantities.EarlyStopping: true")
    adam = {item.rule: item for item in diagnose(make_run(optimizer="Adam")).not_checked}
    assert adam["early_stopping"].reason == "needs EarlyStopping, defined for plain SGD only; this run uses Adam"


def test_too_few_tracked_steps_are_not_judged():
    diagnosis = diagnose(make_run(steps=3, change=_set("Alpha", lambda s, rng: 0.9)))
    assert "lr_too_large" in {item.rule for item in diagnosis.not_checked}
    skipped = next(item for item in diagnosis.not_checked if item.rule == "lr_too_large")
    assert skipped.reason == "only 3 tracked steps of Alpha so far (needs 5)"
    assert skipped.enable == "train longer, or track Alpha more often (instruments.every)"
    one = next(item for item in diagnose(make_run(steps=1)).not_checked if item.rule == "stalled_training")
    assert (one.reason, one.enable, one.too_few) == ("only 1 step loss so far (needs 20)", "more training steps", True)
    assert not next(item for item in diagnose(make_run(drop=("Alpha",))).not_checked if item.rule == "lr_too_small").too_few  # none at all


def test_a_diverged_run_lists_the_rules_it_stopped_too_early_for_on_one_line() -> None:
    def report(status: str, loss: Callable[[int], float] | None = None) -> str:
        console = Console(file=io.StringIO(), width=400)
        console.print(render_text(diagnose(make_run(steps=3, status=status, drop=("HessMaxEV",), loss=loss))))
        return console.file.getvalue()

    diverged = report("diverged")
    line = next(line for line in diverged.splitlines() if "too few records before the run diverged" in line)
    assert "lr_too_large" in line and "stalled_training" in line
    assert "train longer" not in diverged and "more training steps" not in diverged
    assert "  early_stopping: needs EarlyStopping, defined for plain SGD only; " in diverged  # not recorded at all: listed as ever
    completed = report("completed")
    assert "before the run diverged" not in completed and "lr_too_large: only 3 tracked steps of Alpha so far" in completed
    # on_nonfinite: skip completes a run that went NaN and tracks none of its skipped steps: no longer run would check more
    skipped = report("completed", loss=lambda step: 2.0 if step < 1 else math.nan)
    assert "divergence" in skipped and "train longer" not in skipped
    assert "lr_too_large" in next(line for line in skipped.splitlines() if "too few records before the run diverged" in line)


class _LossAbove(Rule):
    name = "loss_above_five"
    requires = ("loss",)
    min_points = 1
    meaning, hint = "loss high", "lower it"

    def check(self, run: RunSeries) -> Finding | None:
        loss = run.loss()
        return self.report(loss.span(), []) if loss.values[-1] > 5 else None


def test_live_alert_is_raised_once_per_episode():
    alerts: list[Finding] = []
    cleared: list[tuple[str, int, int]] = []
    live = LiveDiagnosis(
        on_alert=alerts.append, check_every=1, quiet_checks=3, rules=[_LossAbove()], manifest={"instruments": {"parameters": PARAMS}},
        on_clear=lambda *args: cleared.append(args),
    )
    losses = [1.0] * 5 + [9.0] * 10 + [1.0] * 2 + [9.0] * 3 + [1.0] * 5 + [9.0] * 2
    for step, loss in enumerate(losses):
        live.on_step({"step": step, "loss": loss, "lr": [0.1], "quantities": {}})
    assert [alert.steps[1] for alert in alerts] == [5, 25]  # the short dip at 15-16 does not end the episode
    assert cleared == [("loss_above_five", 5, 22)]  # quiet at steps 20, 21 and 22
    live.on_end(None)
    assert cleared == [("loss_above_five", 5, 22)] and list(live.active) == ["loss_above_five"]  # still firing at the end


def test_a_live_episode_closes_after_quiet_checks_with_new_tracked_values():
    """The quick-start tracks every 64th step and checks every 25th: three quiet checks saw one
    new Alpha, and its lr_too_large episode closed at step 1149 to reopen at 1174. Quiet checks
    count once new quantities arrived (every check, in a run that tracks none)."""
    class _AlphaAbove(Rule):
        name, requires, min_points, meaning, hint = "alpha_above", ("Alpha",), 1, "overshoot", "decay"

        def check(self, run: RunSeries) -> Finding | None:
            alpha = run.scalar("Alpha")
            return self.report(alpha.span(), []) if alpha.values[-1] > 0.5 else None

    cleared: list[tuple[str, int, int]] = []
    live = LiveDiagnosis(check_every=1, quiet_checks=3, rules=[_AlphaAbove()], on_clear=lambda *args: cleared.append(args))
    for step in range(40):  # tracked every 8th step: Alpha 0.9, then 0.1 at step 16 only, then 0.9
        quantities = {"Alpha": 0.1 if step == 16 else 0.9} if step % 8 == 0 else {}
        live.on_step({"step": step, "loss": 1.0, "lr": [0.1], "quantities": quantities})
    assert cleared == [] and list(live.active) == ["alpha_above"]  # one quiet value, eight quiet checks
    for step in range(40, 72):  # quiet from here on: closed at the third tracked step
        live.on_step({"step": step, "loss": 1.0, "lr": [0.1], "quantities": {"Alpha": 0.1} if step % 8 == 0 else {}})
    assert cleared == [("alpha_above", 0, 56)]


def test_live_episodes_not_firing_at_the_end_are_closed_there():
    cleared: list[tuple[str, int, int]] = []
    live = LiveDiagnosis(check_every=1, quiet_checks=3, rules=[_LossAbove()], on_clear=lambda *args: cleared.append(args))
    for step, loss in enumerate([9.0] * 4 + [1.0]):
        live.on_step({"step": step, "loss": loss, "lr": [0.1], "quantities": {}})
    assert cleared == [] and list(live.active) == ["loss_above_five"]  # one quiet check of three
    live.on_end(None)
    assert cleared == [("loss_above_five", 0, 4)] and live.active == {}


def test_live_diagnosis_uses_the_registered_rules_on_records_so_far():
    run = make_run(loss=lambda s: math.nan if s >= 120 else train_loss(s))
    live = LiveDiagnosis(check_every=10, manifest=run.manifest, config=run.config)
    for record in run.steps:
        live.on_step(record)
    assert [alert.rule for alert in live.alerts] == ["divergence"]
    assert live.alerts[0].steps == (120, 120)  # raised at the first non-finite loss, not at the next check


def test_a_resumed_runs_live_diagnosis_sees_the_records_from_before_its_checkpoint():
    """Alpha at 0.8 over the first 150 steps: lr_too_large, which the 30 healthy steps after the
    resume do not hide from ``diagnose``; so the live diagnosis must see those steps too."""
    run = make_run(change=_set("Alpha", lambda s, rng: 0.8 if s < 150 else 0.0), steps=180)
    assert "lr_too_large" in [finding.rule for finding in diagnose(run).findings]
    before = [record for record in run.steps if record["step"] < 150]
    evals = [record for record in run.evals if record["step"] <= 150]
    for history, expected in ((None, False), ((before, evals), True)):
        live = LiveDiagnosis(check_every=10, manifest=run.manifest, config=run.config, history=history)
        for record in run.steps[150:]:
            live.on_step(record)
        live.on_end(None)
        assert ("lr_too_large" in live.active) is expected
    assert len(before) == 150 and len(live.series.steps) == 180  # the history's lists are not extended in place


def test_series_are_extended_as_records_arrive():
    records: list[dict[str, Any]] = []
    series = RunSeries({"instruments": {"parameters": PARAMS}}, records, [])
    assert len(series.scalar("Alpha")) == 0
    records += [{"step": i, "loss": 1.0, "quantities": {"Alpha": float(i)}} for i in range(4)]
    assert list(series.scalar("Alpha").values) == [0.0, 1.0, 2.0, 3.0]
    records.append({"step": 4, "loss": 1.0, "quantities": {}})
    assert len(series.scalar("Alpha")) == 4 and len(series.loss()) == 5


def test_windows():
    series = Series(list(range(100)), [float(i) for i in range(100)])
    assert series.last().span() == (50, 99) and series.first().span() == (0, 9)
    assert series.between(0.5, 0.6).span() == (50, 59)
    assert len(series.sample(10)) == 10 and series.sample(10).steps[-1] == 99
    assert series.median() == 49.5 and math.isnan(Series([], []).median())


def test_text_report_shows_evidence_against_thresholds():
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render_text(diagnose(make_run(change=_set("Alpha", lambda s, rng: 0.8)))))
    text = console.file.getvalue()
    assert "WARNING" in text and "lr_too_large" in text and "steps 100-199" in text
    assert "median Alpha, last 50% of tracked steps: 0.8 > 0.5" in text
    assert "meaning:" in text and "try:" in text and "healthy" not in text


def test_text_report_of_a_healthy_run():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_text(diagnose(make_run())))
    assert "healthy: no warnings" in console.file.getvalue()
    assert "  early_stopping: needs EarlyStopping, defined for plain SGD only; this run uses SGD with momentum 0.9; to check it: a run with plain SGD (no momentum, weight decay or Nesterov)" in console.file.getvalue().splitlines()


def test_json_structure_is_versioned_and_strict_json():
    data = diagnosis_to_dict(diagnose(make_run(loss=lambda s: math.nan if s > 150 else 2.0)))
    text = json.dumps(data, allow_nan=False)
    assert set(data) == {"schema_version", "run", "healthy", "worst", "findings", "checked", "not_checked", "notes"}
    assert data["schema_version"] == 1 and data["worst"] == "error" and not data["healthy"]
    finding = data["findings"][0]
    assert set(finding) == {"rule", "severity", "steps", "evidence", "meaning", "hint"}
    assert set(finding["evidence"][0]) == {"metric", "value", "threshold", "comparison"}
    assert '"nan"' in text


def write_run_dir(path: Path, run: RunData) -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps(run.manifest))
    (path / "steps.jsonl").write_text("".join(json.dumps(record) + "\n" for record in run.steps))
    (path / "evals.jsonl").write_text("".join(json.dumps(record) + "\n" for record in run.evals))
    return path


@pytest.mark.parametrize(("fail_on", "code"), [(None, 0), ("info", 1), ("warning", 1), ("error", 0)])
def test_command_exit_code_follows_fail_on(tmp_path: Path, fail_on: str | None, code: int):
    path = write_run_dir(tmp_path / "run", make_run(change=_set("Alpha", lambda s, rng: 0.8)))
    assert run_diagnose(path, as_json=False, fail_on=fail_on, console=Console(file=io.StringIO())) == code


def test_command_prints_json(tmp_path: Path):
    path = write_run_dir(tmp_path / "run", make_run())
    console = Console(file=io.StringIO(), width=40)
    assert run_diagnose(path, as_json=True, fail_on="warning", console=console) == 0
    assert json.loads(console.file.getvalue())["healthy"] is True


def test_command_says_what_reading_the_run_worked_around(tmp_path: Path):
    """A run that recorded 200 steps whose steps.jsonl lost all but 120 and ends mid-record: the
    report uses what is left and says so, in text and JSON, before the findings."""
    run = make_run()
    run.manifest["steps_completed"] = 200
    path = write_run_dir(tmp_path / "run", run)
    lines = (path / "steps.jsonl").read_text().splitlines(keepends=True)
    (path / "steps.jsonl").write_text("".join(lines[:120]) + lines[120][:15])
    console = Console(file=io.StringIO(), width=200, color_system=None)
    assert run_diagnose(path, as_json=False, fail_on=None, console=console) == 0
    text = console.file.getvalue().splitlines()
    assert text[0].startswith("diagnosis of run: mnist1d_mlp with SGD, completed, 120 steps")
    assert text[1:3] == [
        "note: steps.jsonl: the last line (line 121) is cut off and was ignored",
        "note: steps.jsonl holds 120 of the 200 steps the run recorded: records were lost, and what follows uses those left",
    ]
    console = Console(file=io.StringIO(), width=200)
    run_diagnose(path, as_json=True, fail_on=None, console=console)
    assert json.loads(console.file.getvalue())["notes"] == [line.removeprefix("note: ") for line in text[1:3]]
    assert diagnosis_to_dict(diagnose(make_run()))["notes"] == []


def test_command_rejects_bad_input(tmp_path: Path):
    with pytest.raises(CockpitError, match="does not exist"):
        run_diagnose(tmp_path / "missing", as_json=False, fail_on=None, console=Console(file=io.StringIO()))
    with pytest.raises(CockpitError, match="did you mean 'warning'"):
        run_diagnose(tmp_path, as_json=False, fail_on="warn", console=Console(file=io.StringIO()))


def test_registry_refuses_duplicates_and_documents_every_rule():
    with pytest.raises(ValueError, match="twice"):
        register(RULES["divergence"])
    section = (Path(__file__).parents[1] / "README.md").read_text()
    for name, rule in RULES.items():
        assert rule.source and rule.meaning and rule.hint and rule.requires
        assert f"`{name}`" in section
    assert len({rule.priority for rule in RULES.values()}) == len(RULES)


def test_diagnosis_never_imports_torch(tmp_path: Path):
    path = write_run_dir(tmp_path / "run", make_run())
    code = (
        "import sys, io; from pathlib import Path; from rich.console import Console; "
        "from cockpit_cli.diagnosis.command import run_diagnose; "
        f"run_diagnose(Path({str(path)!r}), False, None, Console(file=io.StringIO())); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_rules_leave_their_cases_to_other_rules() -> None:
    """A zero learning rate is frozen parameters, not a learning rate too small or a stall; far too
    short steps are a learning rate too small, not a stall; a layer without gradient is dead, not
    vanishing; a loss rising over a few steps is not yet a divergence."""
    flat = lambda s: 2.3 + 0.001 * math.sin(s)  # noqa: E731
    frozen = _set("UpdateSize", lambda s, rng: [0.0] * 6)
    found = rules_found(make_run(change=frozen, loss=flat, lr=0.0))
    assert "frozen_parameters" in found and "stalled_training" not in found
    found = rules_found(make_run(change=lambda s, q, rng: (frozen(s, q, rng), q.__setitem__("Alpha", -0.99)), loss=flat, lr=0.0))
    assert "frozen_parameters" in found and "lr_too_small" not in found
    found = rules_found(make_run(change=_set("Alpha", lambda s, rng: -0.99), loss=flat))
    assert "lr_too_small" in found and "stalled_training" not in found
    assert "vanishing_gradients" not in rules_found(make_run(change=_no_gradient))
    assert "divergence" not in rules_found(make_run(steps=8, loss=lambda s: 2.0 * 10**s))


def test_early_stopping_needs_the_criterion_met_at_most_recent_steps() -> None:
    assert "early_stopping" not in rules_found(make_run(change=_briefly("EarlyStopping", 0.3, -0.5, 0.2)))
    assert "early_stopping" in rules_found(make_run(change=_briefly("EarlyStopping", 0.3, -0.5, 0.8)))


def test_frozen_parameters_name_the_frozen_ones_or_say_that_all_are() -> None:
    frozen_rule = RULES["frozen_parameters"]
    some = next(f for f in diagnose(make_run(change=_frozen)).findings if f.rule == "frozen_parameters")
    assert len(some.evidence) == 1 and "2.weight" in some.evidence[0].metric and some.hint == frozen_rule.hint
    every = next(f for f in diagnose(make_run(change=_set("UpdateSize", lambda s, rng: [0.0] * 6))).findings if f.rule == "frozen_parameters")
    assert len(every.evidence) == 1 and "none of the 6 parameters" in every.evidence[0].metric and every.hint != frozen_rule.hint


def test_live_checks_every_25_steps_then_every_1_percent_of_the_steps_so_far() -> None:
    live = LiveDiagnosis(check_every=25, rules=[])
    checked: list[int] = []
    original = live.check
    live.check = lambda: (checked.append(len(live.series.steps)), original())[1]
    for step in range(10_000):
        live.on_step({"step": step, "loss": 1.0})
    gaps = [b - a for a, b in zip([0, *checked], checked)]
    assert checked[:3] == [25, 50, 75] and all(gap >= 25 for gap in gaps)
    assert all(gap >= seen // 100 for gap, seen in zip(gaps, checked))  # 50 steps apart at 5,000 steps, 99 near 10,000
    assert max(gaps) <= 100 and len(checked) < 250  # 400 checks at a fixed 25


def test_window_helpers_skip_non_finite_values_keep_a_point_and_ragged_rows() -> None:
    assert finite_median([1.0, math.inf, 2.0, None, math.nan]) == 1.5
    assert math.isnan(finite_median([math.nan, None]))
    series = Series(list(range(10)), [float(step) for step in range(10)])
    assert series.between(0.5, 0.5).values == [5.0] and series.between(0.2, 0.4).values == [2.0, 3.0]
    table = Table([0, 1, 2], [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0, 7.0]])  # a parameter missing from one record
    column = table.column(2)
    assert (column.steps, column.values) == ([0, 2], [3.0, 7.0])


def test_the_report_text_spells_out_every_kind_of_evidence() -> None:
    from cockpit_cli.diagnosis.finding import Diagnosis, Evidence

    evidence = (
        Evidence("final loss", math.nan, "finite", "not"),
        Evidence("median Alpha", 1.234567, [-0.123456, 0.5], "outside"),
        Evidence("uses momentum", True, None, "context"),
        Evidence("largest gradient norm", math.inf, 100.0, ">"),
    )
    finding = Finding("noisy_gradients", "info", (7, 7), evidence, "The batch is small.", "double the batch")
    diagnosis = Diagnosis({"name": "r", "problem": "p", "optimizer": "SGD", "status": "completed", "steps": 9, "tracked_steps": 9}, [finding], ["noisy_gradients"])
    console = Console(file=io.StringIO(), width=200)
    console.print(render_text(diagnosis))
    lines = console.file.getvalue().splitlines()
    assert "noisy_gradients  step 7" in lines[2]  # one step, not "steps 7-7"
    assert lines[3:7] == [
        "  - final loss: nan (expected finite)",
        "  - median Alpha: 1.235, outside [-0.1235, 0.5]",
        "  - uses momentum: true",
        "  - largest gradient norm: inf > 100",
    ]
    assert "healthy: no warnings (1 rules checked)" in lines  # an info finding leaves the run healthy
    assert diagnosis_to_dict(diagnosis)["healthy"] is True and diagnosis_to_dict(diagnosis)["worst"] == "info"


def finding_of(run: RunData, rule: str) -> Finding | None:
    """The finding of ``rule`` on ``run`` (``None`` when it found nothing)."""
    return next((item for item in diagnose(run).findings if item.rule == rule), None)


def evidence_of(found: Finding | None) -> list[tuple[str, Any, Any, str]]:
    assert found is not None
    return [(item.metric, item.value, item.threshold, item.comparison) for item in found.evidence]


def _zero_gradients(share: float, indices: tuple[int, ...] = (2,)) -> Change:
    def change(step: int, q: dict[str, Any], rng: random.Random) -> None:
        for index in indices:
            q["LayerStats"]["zero_grad_fraction"][index] = share

    return change


def test_dead_units_threshold_window_and_cut_evidence() -> None:
    found = finding_of(make_run(change=_zero_gradients(0.7)), "dead_units")  # the threshold itself counts
    assert evidence_of(found) == [("median share of zero gradient entries of 2.weight, last 50%", 0.7, 0.7, ">=")]
    assert found.steps == (100, 199)
    # outputs dead over most of the run, but no longer in most of its second half, have recovered
    recovered = lambda s, q, rng: q["Activations"]["3"].__setitem__("zero_fraction", 0.99 if s < 140 else 0.5)  # noqa: E731
    assert finding_of(make_run(change=recovered), "dead_units") is None
    # six parameters past the threshold: four are listed, then how many more
    every = finding_of(make_run(change=_zero_gradients(0.9, tuple(range(6)))), "dead_units")
    assert [item.metric.split(" of ")[-1] for item in every.evidence[:4]] == [f"{name}, last 50%" for name in PARAMS[:4]]
    assert evidence_of(every)[4] == ("further parameters or layers past the same threshold", 2, None, "context")
    five = finding_of(make_run(change=_zero_gradients(0.9, tuple(range(5)))), "dead_units")
    assert len(five.evidence) == 5 and all(item.comparison == ">=" for item in five.evidence)


def test_divergence_in_the_gradient_norm_alone() -> None:
    nan_gradient = lambda s, q, rng: q["GradNorm"].__setitem__(0, math.nan) if s == 150 else None  # noqa: E731
    found = finding_of(make_run(change=nan_gradient), "divergence")
    assert evidence_of(found)[0][0] == "first non-finite loss or gradient norm (step 150)" and found.steps == (150, 199)


def test_early_stopping_at_exactly_half_of_the_recent_steps_and_not_at_zero() -> None:
    assert finding_of(make_run(change=_set("EarlyStopping", lambda s, rng: 0.3 if s % 2 else -0.3)), "early_stopping") is not None
    assert finding_of(make_run(change=_set("EarlyStopping", lambda s, rng: 0.0)), "early_stopping") is None


def test_exploding_gradients_thresholds() -> None:
    grown = _set("GradNorm", lambda s, rng: [0.5 if s < 20 else 150.0] * 6)  # 300x the early norm
    assert evidence_of(finding_of(make_run(change=grown), "exploding_gradients")) == [
        ("median gradient norm, last 50% / first 10% of tracked steps", pytest.approx(300.0), 100.0, ">")
    ]
    found = finding_of(make_run(change=_layer_scale(80.0)), "exploding_gradients")
    assert evidence_of(found)[0][:2] == ("median gradient norm of layer 0 / last layer, last 50%", pytest.approx(80 * 0.6 / 0.6, rel=0.1))

    def unknown_first_layer(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["GradNorm"][0] = q["GradNorm"][1] = math.nan  # its ratio is unknown, the next layer's is not
        q["GradNorm"][2] *= 200
        q["GradNorm"][3] *= 200

    assert evidence_of(finding_of(make_run(change=unknown_first_layer), "exploding_gradients"))[0][0].startswith("median gradient norm of layer 2 ")


def test_vanishing_gradients_below_a_thousandth() -> None:
    found = finding_of(make_run(change=_layer_scale(5e-4)), "vanishing_gradients")
    assert evidence_of(found)[0][0] == "median gradient norm of layer 0 / last layer, last 50%" and evidence_of(found)[0][2:] == (1e-3, "<")


def test_all_frozen_reports_the_least_frozen_share() -> None:
    def mostly(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["UpdateSize"] = [0.0] * 5 + [0.0 if step % 20 else 0.01]  # the last parameter moves at one step in 20

    found = finding_of(make_run(change=mostly), "frozen_parameters")
    assert evidence_of(found) == [("share of the last 50% of tracked steps where none of the 6 parameters changed", 0.95, 0.9, ">=")]


def test_frozen_parameters_from_layer_stats_without_update_size() -> None:
    frozen = lambda s, q, rng: q["LayerStats"]["update_ratio"].__setitem__(4, 0.0)  # noqa: E731
    found = finding_of(make_run(change=frozen, drop=("UpdateSize",)), "frozen_parameters")
    assert "4.weight did not change" in evidence_of(found)[0][0]


def test_gradient_noise_window_and_a_norm_test_of_one() -> None:
    stuck = lambda s: 2.3 - s / 1000  # noqa: E731
    found = finding_of(make_run(change=_set("NormTest", lambda s, rng: 1.0), loss=stuck), "gradient_noise")
    assert [item[0] for item in evidence_of(found)] == ["median NormTest, tracked steps after the first 10%", "relative loss decrease since the start"]
    assert found.steps == (20, 199)
    # noisy only in the first tenth: after it, half of the steps are quiet and the median is below the threshold
    early = _set("NormTest", lambda s, rng: 0.99 if s < 20 or s % 2 else 0.9)
    assert finding_of(make_run(change=early, loss=stuck), "gradient_noise") is None
    noisy = finding_of(make_run(change=_set("NormTest", lambda s, rng: 0.98), loss=stuck), "gradient_noise")
    assert evidence_of(noisy)[2] == ("noise scale B_simple = B * NormTest^2 / (1 - NormTest^2) (batch size 100)", pytest.approx(100 * 0.98**2 / (1 - 0.98**2)), None, "context")
    unknown = make_run(change=_set("NormTest", lambda s, rng: 0.98), loss=stuck)
    unknown.manifest["batch_size"] = 0  # an API run that ended before its first step: no noise scale of 0
    assert len(evidence_of(finding_of(unknown, "gradient_noise"))) == 2


def test_gradient_noise_of_gradients_accumulated_over_micro_batches_is_judged_for_their_batch() -> None:
    """NormTest describes the first micro-batch; the update's gradient is the mean of the whole
    batch, whose norm test follows from the noise scale B_simple the micro-batch gives."""
    stuck = lambda s: 2.3 - s / 1000  # noqa: E731

    def accumulated(norm_test: float, batch: int, micro: int) -> RunData:
        run = make_run(change=_set("NormTest", lambda s, rng: norm_test), loss=stuck)
        run.manifest.update(batch_size=batch, micro_batch_size=micro, micro_batches=batch // micro)
        return run

    assert finding_of(accumulated(0.98, 64, 16), "gradient_noise") is None  # B_simple 388: for 64 samples 0.93
    found = finding_of(accumulated(0.99, 64, 16), "gradient_noise")  # B_simple 788: 0.96
    noise_scale = 16 * 0.99**2 / (1 - 0.99**2)
    assert evidence_of(found) == [
        ("NormTest of the batch of 64, from B_simple", pytest.approx(math.sqrt(noise_scale / (64 + noise_scale))), 0.95, ">="),
        ("median NormTest of the first micro-batch of 16, tracked steps after the first 10%", pytest.approx(0.99), None, "context"),
        ("relative loss decrease since the start", pytest.approx(0.2 / 2.3 * 0.995, rel=0.1), 0.5, "<"),
        ("noise scale B_simple = B * NormTest^2 / (1 - NormTest^2) (batch size 16)", pytest.approx(noise_scale), None, "context"),
    ]


def test_lr_too_large_by_negative_curvature_its_spans_and_too_few_alphas() -> None:
    assert finding_of(make_run(change=_set("HessMaxEV", lambda s, rng: -50.0)), "lr_too_large") is not None

    def both(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["Alpha"] = 0.9
        if step < 150:
            q["HessMaxEV"] = 50.0

    assert finding_of(make_run(change=both), "lr_too_large").steps == (75, 199)

    def few_alphas(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["HessMaxEV"] = 10.0
        if step < 197:
            del q["Alpha"]
        else:
            q["Alpha"] = 0.9

    assert finding_of(make_run(change=few_alphas), "lr_too_large") is None


def test_lr_too_small_with_one_group_at_zero_and_a_zero_loss() -> None:
    run = make_run(change=_set("Alpha", lambda s, rng: -0.99))
    for record in run.steps:
        record["lr"] = [0.0, 0.1]  # the largest rate decides: one frozen group does not hide the others
    assert finding_of(run, "lr_too_small") is not None
    found = finding_of(make_run(change=_set("Alpha", lambda s, rng: -0.99), loss=lambda s: 0.0), "lr_too_small")
    assert evidence_of(found) == [("median Alpha, last 50% of tracked steps", -0.99, -0.9, "<")]


def test_misscaled_inputs_evidence() -> None:
    negative = _set("InputStats", lambda s, rng: {"mean": -5.0, "std": 1.0, "min": -8.0, "max": -2.0})
    assert evidence_of(finding_of(make_run(change=negative), "misscaled_inputs"))[0] == ("|median input mean|", 5.0, 1.0, ">")
    low = _set("InputStats", lambda s, rng: {"mean": 0.0, "std": 1.0, "min": -500.0, "max": 2.0})
    assert evidence_of(finding_of(make_run(change=low), "misscaled_inputs"))[0] == ("largest |input| (median over batches)", 500.0, 100.0, ">")

    def scaled(step: int, q: dict[str, Any], rng: random.Random) -> None:
        q["InputStats"] = {"mean": 0.0, "std": 50.0, "min": -10.0, "max": 10.0}
        if step >= 100:  # the edge bins fill up in the recent histograms only
            q["GradHist1d"]["counts"] = [500] + [0] * 98 + [500]

    assert evidence_of(finding_of(make_run(change=scaled), "misscaled_inputs"))[-1] == (
        "share of per-sample gradient elements in GradHist1d's clamped edge bins", 1.0, None, "context"
    )


def _overfit(step: int) -> float:
    return 1.0 + abs(step - 50) / 100


def test_overfitting_spans_smoothing_and_gaps_in_the_evaluations() -> None:
    both = finding_of(make_run(valid_loss=lambda s: _overfit(s) + s / 400), "overfitting")
    assert [item[0] for item in evidence_of(both)][::2] == [
        "smoothed validation loss rise since its minimum at step 50", "smoothed train_eval accuracy - valid accuracy at the end"
    ]
    assert both.steps == (50, 200)
    spike = lambda s: train_loss(s) + 0.05 + (1.0 if s == 200 else 0.0)  # one noisy evaluation at the end  # noqa: E731
    assert finding_of(make_run(valid_loss=spike), "overfitting") is None
    unknown_start = finding_of(make_run(valid_loss=lambda s: math.nan if s == 0 else _overfit(s)), "overfitting")
    assert evidence_of(unknown_start)[0][0] == "smoothed validation loss rise since its minimum at step 50"
    run = make_run(valid_loss=_overfit)
    del run.evals[0]["splits"]["train_eval"]  # an evaluation without the training split is left out, not misaligned
    assert finding_of(run, "overfitting").steps == (50, 200)


def test_a_converged_run_is_not_stalled() -> None:
    assert finding_of(make_run(loss=lambda s: 2.0 * math.exp(-s / 10) + 0.3), "stalled_training") is None


def test_series_helpers_largest_rate_settings_ratios_and_ragged_rows() -> None:
    records: list[dict[str, Any]] = []
    series = RunSeries({"instruments": {"parameters": PARAMS}}, records, [], {"optimizer": {"momentum": "high", "dampening": 0.5}})
    assert series.optimizer_setting("momentum") == 0.0 and series.optimizer_setting("dampening") == 0.5
    records += [{"step": i, "lr": [0.0, 0.2, 0.1], "quantities": {"GradNorm": [1.0] * 6}} for i in range(10)]
    assert list(series.lr().values) == [0.2] * 10 and series.layer_ratios() == {"0": 1.0, "2": 1.0}
    records += [{"step": i, "lr": [0.1], "quantities": {"GradNorm": [1e-5, 1e-5, 1.0, 1.0, 1.0, 1.0]}} for i in range(10, 40)]
    assert series.layer_ratios()["0"] == pytest.approx(1e-5)  # recomputed as records arrive
    records.append({"step": 40, "lr": [0.1], "quantities": {"GradNorm": [1.0, 1.0]}})  # a shorter row is left out
    assert series.layer_ratios()["0"] == pytest.approx(1e-5)


def test_window_lengths_at_their_edges() -> None:
    series = Series(list(range(6)), [float(step) for step in range(6)])
    assert series.last().steps == [1, 2, 3, 4, 5]  # half of six, but at least five points
    assert series.between(1.0, 1.0).steps == [5]
    assert Series([], []).fraction(lambda value: True) == 0.0


def test_not_checked_for_lack_of_evaluations_says_how_many_there_are() -> None:
    run = make_run()
    run.evals.clear()
    skipped = {item.rule: item for item in diagnose(run).not_checked}
    assert skipped["overfitting"].reason == "no evaluations with a valid split so far (needs 4)"
    assert skipped["overfitting"].enable == "training.eval_every_epochs or training.eval_every_steps"
    del run.evals[:]
    run.evals.append({"step": 0, "splits": {"valid": {"loss": 1.0}}})
    skipped = {item.rule: item for item in diagnose(run).not_checked}
    assert skipped["overfitting"].reason == "only 1 evaluation with a valid split so far (needs 4)"
    assert skipped["overfitting"].enable == "more evaluations: training.eval_every_epochs or training.eval_every_steps"


def test_severity_orders_findings_before_priority() -> None:
    from cockpit_cli.diagnosis.engine import sort_findings

    def made(rule: str, severity: str, first: int) -> Finding:
        return Finding(rule, severity, (first, first), (), "", "")  # type: ignore[arg-type]

    found = sort_findings([made("misscaled_inputs", "warning", 0), made("early_stopping", "error", 5), made("dead_units", "warning", 0), made("dead_units", "warning", 3)])
    assert [(item.rule, item.steps[0]) for item in found] == [("early_stopping", 5), ("misscaled_inputs", 0), ("dead_units", 0), ("dead_units", 3)]


def test_run_facts_count_tracked_steps_and_show_a_silent_run_as_crashed() -> None:
    run = make_run(status="running")
    run.manifest["heartbeat_at"] = "2020-01-01T00:00:00+00:00"
    for record in run.steps[::2]:
        record["quantities"] = {}
    facts = diagnose(run).run
    assert facts["status"] == "crashed or still running" and (facts["steps"], facts["tracked_steps"]) == (200, 100)


def test_parameter_layers_and_histogram_shares() -> None:
    from cockpit_cli.diagnosis.values import layer_of, peak_shares, share_in_edges

    assert [layer_of(name) for name in ("features.3.weight", "0.bias", "scale")] == ["features.3", "0", "scale"]
    assert share_in_edges({"counts": [3, 1, 0, 4]}) == 7 / 8 and math.isnan(share_in_edges({"counts": [0, 0]}))
    shares = peak_shares({"per_parameter": [[1, 4, 4, 1], [0, 0, 6, 2], [5], [0, 0]]})
    assert shares[:3] == [0.8, 1.0, 1.0] and math.isnan(shares[3])


def test_unknown_entries_of_a_per_parameter_list_are_not_zeros() -> None:
    unknown = _set("UpdateSize", lambda s, rng: [None, "?", 0.1, 0.1, 0.1, 0.1])
    assert finding_of(make_run(change=unknown), "frozen_parameters") is None


def _embedding_rows(step: int, q: dict[str, Any], rng: random.Random) -> None:
    q["LayerStats"]["zero_grad_fraction"][0] = 0.93  # an embedding table: the rows of ids outside the batch


def test_an_embedding_table_s_zero_rows_are_no_dead_units() -> None:
    """A language model's table has zero gradient but in the rows of a batch's ids: dead_units
    fired on every such run. A manifest that does not name its tables is judged as before."""
    run = make_run(change=_embedding_rows)
    assert "dead_units" in rules_found(run)
    run.manifest["instruments"]["lookup_tables"] = ["0.weight"]
    assert "dead_units" not in rules_found(run)
