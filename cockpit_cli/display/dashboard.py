"""The live terminal cockpit: an observer that keeps a :class:`DashboardState` and a Rich ``Live``.

The training loop only ever updates the state under a lock (appending to arrays, replacing the
latest dicts). Drawing happens on Rich's refresh thread, at most four times a second: it takes a
snapshot of the state under the lock and renders the snapshot outside it, so the loop never
waits for the screen. While the run trains, a new frame is drawn every half second at most (new
records, the clock); in between, Rich redraws the last frame, which costs little.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, is_dataclass
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from cockpit_cli.display.layout import DashboardView
from cockpit_cli.display.panels.summary import summary
from cockpit_cli.display.state import DashboardState, RunInfo
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, StepRecord

REFRESH_PER_SECOND = 4
REDRAW_SECONDS = 0.5  # a new frame at most this often while training (a frame costs a few ms)
DRAW_BUDGET = 0.01  # and no more often than keeps drawing under this share of the time


class LiveDashboard:
    """Observer drawing the Cockpit dashboard in the terminal while a run trains.

    Args:
        console: The terminal to draw on.
        run_dir: The run directory (shown in the header and in the final summary).
        refresh_per_second: Redraws per second at most.
        history: The step and evaluation records a resumed run kept from before its checkpoint
            (as in the run directory), shown from the start.
    """

    def __init__(
        self,
        console: Console,
        run_dir: str | None = None,
        refresh_per_second: float = REFRESH_PER_SECOND,
        history: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    ):
        self.console = console
        self.run_dir = run_dir
        self.history = history
        self.state = DashboardState()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.refresh_cpu_seconds = 0.0  # processor time of the refresh thread so far
        self._view: DashboardView | None = None
        self._view_version = -1
        self._view_time = 0.0
        self.live = Live(
            console=console,
            get_renderable=self._renderable,
            auto_refresh=True,
            refresh_per_second=refresh_per_second,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=True,
        )

    # -- observer protocol (called from the training loop; each is O(1)-ish) ---------------

    def on_start(self, meta: RunMeta) -> None:
        fields = asdict(meta) if is_dataclass(meta) else dict(vars(meta))
        with self.lock:
            self.state.start(RunInfo.from_mapping(fields, run_dir=self.run_dir))
            steps, evals = self.history or ([], [])
            for record in evals:
                self.state.add_eval_record(record)
            for record in steps:
                self.state.add_step_record(record)
            self.started = time.monotonic()
            self._view = None  # the frame built before the start (``Live`` builds one) is stale now
        self.live.start()

    def on_step(self, record: StepRecord) -> None:
        with self.lock:
            self.state.add_step(record.step, record.epoch, record.loss, record.lr, record.time, record.quantities)

    def on_eval(self, record: EvalRecord) -> None:
        splits = {name: {"loss": m.loss, "accuracy": m.accuracy} for name, m in record.splits.items()}
        with self.lock:
            self.state.add_eval(record.step, record.epoch, record.time, splits)

    def on_warning(self, text: str) -> None:
        """Show a warning that arose during the run (:meth:`DashboardState.add_warning`)."""
        with self.lock:
            self.state.add_warning(text)

    def on_end(self, end: RunEnd) -> None:
        with self.lock:
            self.state.finish(end.status.value, end.message, end.train_seconds)
            for warning in end.warnings:
                self.state.add_alert("warning", warning)
        self.close()

    # -- drawing ---------------------------------------------------------------------------

    def add_alert(self, severity: str, text: str, key: str | None = None) -> None:
        """Show an alert (from any thread), e.g. a finding of a live diagnosis."""
        with self.lock:
            self.state.add_alert(severity, text, key)

    def close(self) -> None:
        """Stop the live display, leaving the final frame in the terminal (idempotent)."""
        if self.live.is_started:
            self.live.stop()

    def final_summary(self) -> RenderableType:
        """The static summary to print after the run: results, final metrics, next command."""
        with self.lock:
            return summary(self.state.snapshot(), self.run_dir)

    def _renderable(self) -> RenderableType:
        """A new frame every REDRAW_SECONDS while running (new records, the clock), less often if
        frames are slow to draw (DRAW_BUDGET), and on any change afterwards; in between, the last
        frame (drawn already, so it costs little)."""
        if threading.current_thread() is not threading.main_thread():
            self.refresh_cpu_seconds = time.thread_time()
        now = time.monotonic()
        with self.lock:
            if self.state.status == "running":
                drawn = self._view.draw_seconds if self._view is not None else 0.0
                stale = now - self._view_time >= max(REDRAW_SECONDS, drawn / DRAW_BUDGET)
            else:
                stale = self.state.version != self._view_version
            if stale or self._view is None:
                snapshot = self.state.snapshot(clock=now - self.started)
                self._view_version, self._view_time = self.state.version, now
        if stale or self._view is None:
            self._view = DashboardView(snapshot, fit_height=True)
        return self._view

    def __enter__(self) -> LiveDashboard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
