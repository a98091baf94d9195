"""The end-of-run summary, computed from plain record dictionaries."""

from __future__ import annotations

import math
from typing import Any, Sequence

from cockpit_cli.storage.schema import SCHEMA_VERSION


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_metrics(evals: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return, per split, the lowest loss and highest accuracy over all evaluations, with steps."""
    best: dict[str, dict[str, Any]] = {}
    for record in evals:
        for split, metrics in record.get("splits", {}).items():
            entry = best.setdefault(split, {"loss": None, "loss_step": None, "accuracy": None, "accuracy_step": None})
            loss, accuracy = metrics.get("loss"), metrics.get("accuracy")
            if _finite(loss) and (entry["loss"] is None or loss < entry["loss"]):
                entry["loss"], entry["loss_step"] = loss, record["step"]
            if _finite(accuracy) and (entry["accuracy"] is None or accuracy > entry["accuracy"]):
                entry["accuracy"], entry["accuracy_step"] = accuracy, record["step"]
    return best


def summarize(
    status: str,
    message: str | None,
    steps: int,
    epochs: int,
    wall_seconds: float,
    recent_losses: Sequence[float],
    evals: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Build ``summary.json``.

    Args:
        status: Final run status.
        message: Why the run ended early, or ``None``.
        steps: Steps completed.
        epochs: Epochs completed.
        wall_seconds: Training time in seconds.
        recent_losses: The last mini-batch losses (their finite mean is the final train loss).
        evals: All evaluation records as dictionaries.
    """
    finite_losses = [loss for loss in recent_losses if _finite(loss)]
    final = evals[-1]["splits"] if evals else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "message": message,
        "steps": steps,
        "epochs": epochs,
        "wall_seconds": round(wall_seconds, 3),
        "final_minibatch_loss": sum(finite_losses) / len(finite_losses) if finite_losses else None,
        "final": {split: {"loss": m.get("loss"), "accuracy": m.get("accuracy")} for split, m in final.items()},
        "best": best_metrics(evals),
    }
