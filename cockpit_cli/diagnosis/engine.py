"""Runs the diagnosis rules over a run: a finished run directory, or the records seen so far.

Rules whose data is missing are skipped and listed as "not checked" with what would enable
them. Findings are ordered most severe first, then root causes before symptoms (each rule's
``priority``), so the first finding is the one to act on.
"""

from __future__ import annotations

from typing import Any, Iterable

from cockpit_cli.diagnosis.finding import Diagnosis, Finding, NotChecked, severity_rank
from cockpit_cli.diagnosis.rules import RULES
from cockpit_cli.diagnosis.rules.base import Rule
from cockpit_cli.diagnosis.series import RunSeries
from cockpit_cli.diagnosis.values import is_number
from cockpit_cli.plain_sgd import unlike_plain_sgd
from cockpit_cli.storage import schema

# The smallest instruments preset that tracks each quantity; others are enabled by name.
PRESET_ORDER = ("economy", "business", "full")
ENABLED_BY_PRESET: dict[str, str] = {
    **dict.fromkeys(
        ("Alpha", "Distance", "GradHist1d", "GradNorm", "InnerTest", "Loss", "NormTest", "OrthoTest", "UpdateSize", "LayerStats", "Activations", "InputStats"),
        "economy",
    ),
    **dict.fromkeys(("TICDiag", "HessTrace"), "business"),
    **dict.fromkeys(("HessMaxEV", "GradHist2d"), "full"),
}
# Quantities defined for plain SGD only (the instruments' ``plain_sgd_only``).
PLAIN_SGD_ONLY = ("CABS", "EarlyStopping")
WITH_PLAIN_SGD = "a run with plain SGD (no momentum, weight decay or Nesterov)"
# How records of each kind are counted: one, several.
RECORD_FIELDS = {
    "loss": ("step loss", "step losses"),
    "lr": ("learning rate", "learning rates"),
    "evals": ("evaluation with a valid split", "evaluations with a valid split"),
}
EVALUATIONS = "training.eval_every_epochs or training.eval_every_steps"
# The same advice for a run of the Python API (``TrackedRun``), whose settings are its arguments.
API_EVALUATIONS = "run.evaluate(step, valid=(loss, accuracy)) more often"


def _count(number: int, name: str) -> str:
    """``number`` records of ``name`` in words: ``"only 1 tracked step of Alpha"``, ``"no step losses"``."""
    one, several = RECORD_FIELDS.get(name, (f"tracked step of {name}", f"tracked steps of {name}"))
    return f"no {several}" if number == 0 else f"only {number} {one if number == 1 else several}"


def how_to_enable(name: str, api: bool = False) -> str:
    """Say how to record ``name`` (a quantity or a record field) in a run that does not (``api``:
    a run of the Python API, whose settings are ``TrackedRun``'s arguments)."""
    if name == "evals":
        return API_EVALUATIONS if api else EVALUATIONS
    if name in RECORD_FIELDS:
        return "more training steps"
    preset = ENABLED_BY_PRESET.get(name)
    by_name = f'TrackedRun(..., quantities={{"{name}": True}})' if api else f"instruments.quantities.{name}: true"
    by_preset = f'TrackedRun(..., preset="{preset}")' if api else f"preset {preset}"
    return f"{by_preset} or higher, or {by_name}" if preset else by_name


def how_to_get_more(name: str, api: bool = False) -> str:
    """Say how to get more records of ``name``, which a run records too few of (``api``: see :func:`how_to_enable`)."""
    if name == "evals":
        return API_EVALUATIONS if api else f"more evaluations: {EVALUATIONS}"
    if name in RECORD_FIELDS:
        return "more training steps"
    return f"train longer, or track {name} more often ({'TrackedRun(..., every=k)' if api else 'instruments.every'})"


def _missing(rule: Rule, run: RunSeries) -> NotChecked | None:
    """Why ``rule`` cannot run on ``run`` (``None`` when it can)."""
    planned = run.manifest.get("total_steps")
    if rule.min_share and run.manifest.get("status", "running") == "running" and is_number(planned) and run.count("loss") < rule.min_share * planned:
        seen = run.count("loss")
        return NotChecked(rule.name, f"only {seen} of {planned} planned steps so far (judged after {rule.min_share:.0%} of them)", "let the run go on", too_few=True)
    api = schema.from_api(run.manifest)
    unavailable = (run.manifest.get("instruments") or {}).get("unavailable") or {}
    optimizer = run.config.get("optimizer") or {}
    not_plain = unlike_plain_sgd(run.optimizer(), optimizer)
    for requirement in rule.requires:
        options = (requirement,) if isinstance(requirement, str) else requirement
        counts = {name: run.count(name) for name in options}
        if max(counts.values()) >= rule.min_points:
            continue
        cheapest = min(options, key=lambda name: PRESET_ORDER.index(ENABLED_BY_PRESET.get(name, "full")))
        if not_plain and all(name in PLAIN_SGD_ONLY for name in options):  # tracking it would not help
            return NotChecked(rule.name, f"needs {' or '.join(options)}, defined for plain SGD only; this run uses {not_plain}", WITH_PLAIN_SGD)
        why = "; ".join(f"{name} unavailable: {unavailable[name]}" for name in options if name in unavailable)
        if why:
            return NotChecked(rule.name, why, "a run without that obstacle")
        if any(counts.values()) or all(name in RECORD_FIELDS for name in options):
            best = max(options, key=lambda name: counts[name])
            enable = how_to_get_more(best, api) if counts[best] else how_to_enable(best, api)
            return NotChecked(rule.name, f"{_count(counts[best], best)} so far (needs {rule.min_points})", enable, too_few=True)
        return NotChecked(rule.name, f"needs {' or '.join(options)}", how_to_enable(cheapest, api))
    return None


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; among equals, root causes (lower rule priority) first, then earlier steps."""
    priority = {name: rule.priority for name, rule in RULES.items()}
    return sorted(findings, key=lambda f: (-severity_rank(f.severity), priority.get(f.rule, 99), f.steps[0]))


def run_rules(run: RunSeries, rules: Iterable[Rule] | None = None) -> tuple[list[Finding], list[str], list[NotChecked]]:
    """Run ``rules`` (default: all) over ``run``; return findings (sorted), checked rules and skipped ones."""
    findings, checked, skipped = [], [], []
    for rule in RULES.values() if rules is None else rules:
        missing = _missing(rule, run)
        if missing is not None:
            skipped.append(missing)
            continue
        checked.append(rule.name)
        finding = rule.check(run)
        if finding is not None:
            findings.append(finding)
    return sort_findings(findings), checked, skipped


def run_status(manifest: dict[str, Any]) -> str:
    """The manifest's status, with a stale ``running`` shown as crashed or still running."""
    from cockpit_cli.storage.reader import CRASHED_OR_RUNNING, heartbeat_is_stale

    status = str(manifest.get("status", "unknown"))
    return CRASHED_OR_RUNNING if status == "running" and heartbeat_is_stale(manifest) else status


def run_facts(manifest: dict[str, Any], name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts about a run a report starts with."""
    tracked = sum(1 for record in steps if record.get("quantities"))
    return {
        "name": name,
        "problem": manifest.get("problem"),
        "optimizer": manifest.get("optimizer"),
        "status": run_status(manifest),
        "steps": len(steps),
        "tracked_steps": tracked,
    }


def diagnose(run: Any, rules: Iterable[Rule] | None = None) -> Diagnosis:
    """Diagnose a run read by :func:`cockpit_cli.storage.reader.read_run` (a ``RunData``).

    Args:
        run: Anything with ``manifest``, ``config``, ``steps``, ``evals``, ``name`` and ``notes``.
        rules: The rules to run (default: every registered rule).
    """
    series = RunSeries(run.manifest, run.steps, run.evals, run.config)
    findings, checked, skipped = run_rules(series, rules)
    facts = run_facts(run.manifest, run.name, run.steps)
    return Diagnosis(run=facts, findings=findings, checked=checked, not_checked=skipped, notes=list(run.notes))
