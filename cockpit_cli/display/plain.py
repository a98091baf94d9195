"""A plain, log-file friendly progress printer: one line every N steps and one per evaluation."""

from __future__ import annotations

import math
from typing import Any, TextIO

from rich.console import Console

from cockpit_cli.display.panels.common import num
from cockpit_cli.storage.totals import quantity_total
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, StepRecord, not_tracked_lines


# Instruments shown on a step line when the step tracked them: (quantity, label).
KEY_INSTRUMENTS = (("Alpha", "alpha"), ("GradNorm", "grad-norm"), ("NormTest", "norm-test"), ("HessMaxEV", "hess-max-ev"))


def instrument_summary(quantities: dict[str, Any]) -> str:
    """``alpha 0.12  grad-norm 1.7  norm-test 0.85`` for the key instruments present.

    Per-parameter values (GradNorm) are reduced to their total norm.
    """
    parts = []
    for name, label in KEY_INSTRUMENTS:
        value = quantity_total(name, quantities.get(name))
        if value is not None:
            parts.append(f"{label} {num(value)}")
    return "  ".join(parts)


class PlainLog:
    """Observer printing progress lines to ``stream`` (or a Rich console).

    Args:
        every: Print a step line every ``every`` steps (and the first and last step, and the
            first step of every stretch of non-finite losses).
        console: Where to print; defaults to standard output without colour markup.
    """

    def __init__(self, every: int = 50, console: Console | None = None, stream: TextIO | None = None):
        self.every = max(1, every)
        self.console = console or Console(file=stream, highlight=False, soft_wrap=True)
        self.total_steps = 0
        self.warned: set[str] = set()  # warnings printed when they arose
        self.finite_before = True  # whether the last step's loss was finite

    def on_start(self, meta: RunMeta) -> None:
        self.total_steps = meta.total_steps
        self.console.print(
            f"training {meta.problem} ({meta.num_parameters:,} parameters) with {meta.optimizer} on {meta.device}{_processes(meta)}: "
            f"{meta.total_steps} steps, {meta.steps_per_epoch} per epoch, batch size {meta.batch_size}"
        )
        for line in not_tracked_lines((meta.instruments or {}).get("unavailable") or {}):
            self.console.print(f"note: {line}")

    def on_step(self, record: StepRecord) -> None:
        last = record.step + 1 == self.total_steps
        finite, finite_before = math.isfinite(record.loss), self.finite_before
        self.finite_before = finite
        if record.step % self.every == 0 or last or (finite_before and not finite):  # the first of a run of non-finite losses
            rates = ", ".join(num(rate, 3) for rate in record.lr)
            instruments = instrument_summary(record.quantities)
            self.console.print(
                f"step {record.step:>6}/{self.total_steps}  epoch {record.epoch:>3}  "
                f"loss {num(record.loss)}  lr {rates}  " + (f"{instruments}  " if instruments else "") + f"{record.time:7.1f}s"
            )

    def on_eval(self, record: EvalRecord) -> None:
        parts = []
        for split, metrics in record.splits.items():
            text = f"{split} loss {num(metrics.loss)}"
            if metrics.accuracy is not None:
                text += f" acc {metrics.accuracy:.3f}"
            parts.append(text)
        self.console.print(f"eval after step {record.step} (epoch {record.epoch}): " + " | ".join(parts))

    def add_alert(self, severity: str, text: str, key: str | None = None) -> None:
        """Print an alert line (the dashboard's alerts panel, as a log line)."""
        style = {"warning": "yellow", "critical": "red"}.get(severity)
        self.console.print(f"alert ({severity}) {text}", style=style)

    def close(self) -> None:
        """Nothing to release (the live dashboard's counterpart stops its screen)."""

    def on_warning(self, text: str) -> None:
        self.console.print(f"warning: {text}")
        self.warned.add(text)

    def on_end(self, end: RunEnd) -> None:
        for text in end.warnings:
            if text not in self.warned:
                self.console.print(f"warning: {text}")
        self.console.print(f"run {end.status.value} after {end.steps} steps ({end.train_seconds:.1f}s)")


def _processes(meta: RunMeta) -> str:
    """`` (2 processes, gloo)`` for a data-parallel run, else nothing."""
    world = meta.processes.get("world_size") or 1
    return f" ({world} processes, {meta.processes.get('backend')})" if world > 1 else ""
