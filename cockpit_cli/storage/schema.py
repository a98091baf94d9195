"""Names and version of the run directory's files (documented in the README)."""

from __future__ import annotations

SCHEMA_VERSION = 1

MANIFEST = "run.json"  # status, problem, optimizer, seed, versions, device, timings
CONFIG = "config.yaml"  # the effective (resolved) config
STEPS = "steps.jsonl"  # one StepRecord per line, appended and flushed per step
EVALS = "evals.jsonl"  # one EvalRecord per line
SUMMARY = "summary.json"  # final and best metrics, written at the end
LOCK = ".lock"  # present while a process writes the directory

# Seconds between manifest rewrites while training (the heartbeat of a running run).
HEARTBEAT_SECONDS = 10.0
API_PROBLEM = "custom"  # the manifest's problem of a run of the Python API (TrackedRun)


# HessTrace's title and symbol per curvature diagonal (the manifest's ``instruments.curvature``).
TRACES = {"hessian": ("Hessian trace", "tr(H)"), "ggn": ("GGN trace", "tr(G)"), "ggn_mc": ("GGN trace (Monte-Carlo)", "tr(G)")}


def trace_names(manifest: dict) -> tuple[str, str]:
    """HessTrace's title and symbol for the run's curvature diagonal (a run that does not say
    which, written before the manifest named it, reads as the Hessian's, the default)."""
    return TRACES.get((manifest.get("instruments") or {}).get("curvature"), TRACES["hessian"])


def lookup_tables(manifest: dict) -> set[str]:
    """The parameters that are embedding tables, whose gradient is zero but in the rows of a
    batch's ids by construction (none in a manifest written before it named them)."""
    return set((manifest.get("instruments") or {}).get("lookup_tables") or [])


def from_api(manifest: dict) -> bool:
    """Whether the manifest is that of a run of the Python API (``TrackedRun``), which has no
    config keys of ``cockpit run`` to advise."""
    return manifest.get("problem") == API_PROBLEM
