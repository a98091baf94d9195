"""``cockpit watch``: the dashboard of a run directory, followed as another process writes it.

The JSON Lines files are read incrementally (only what was appended since the last read, in
bounded chunks), and a line is used only once it is complete, so a cut-off last line is simply
waited for (or, in a finished run, ignored with a note).
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from cockpit_cli.display.layout import DashboardView
from cockpit_cli.display.panels.summary import summary
from cockpit_cli.display.state import DashboardState, RunInfo
from cockpit_cli.errors import CockpitError, ExitCode
from cockpit_cli.storage import schema
from cockpit_cli.storage.reader import read_run

CHUNK_BYTES = 4 << 20
STALE_SECONDS = 6 * schema.HEARTBEAT_SECONDS
APPEAR_SECONDS = 120.0  # how long a watch started with its run waits for the run directory


class JsonLinesFollower:
    """Yields the complete JSON objects appended to a file since the last read.

    Args:
        path: The JSON Lines file (it may not exist yet).
    """

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.bad_lines = path, 0, b"", 0
        self.identity: tuple[int, int] | None = None  # (device, inode) of the file read so far

    def read(self) -> list[dict[str, Any]]:
        """Read up to ``CHUNK_BYTES`` of new data and return the complete records in it."""
        try:
            with self.path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if self._replaced(stat):  # start over
                    self.offset, self.partial, self.identity = 0, b"", (stat.st_dev, stat.st_ino)
                handle.seek(self.offset)
                data = handle.read(CHUNK_BYTES)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                self.bad_lines += 1  # JSON, but not a record
        return records

    def rewritten(self) -> bool:
        """Whether the file was written anew since it was read: replaced by another file (a resumed
        run rewrites its records up to its checkpoint) or cut shorter."""
        if not self.offset:
            return False
        try:
            return self._replaced(self.path.stat())
        except FileNotFoundError:
            return True

    def _replaced(self, stat: os.stat_result) -> bool:
        """Whether ``stat`` is another file's than the one read so far, or that of one cut shorter."""
        return (stat.st_dev, stat.st_ino) != self.identity or stat.st_size < self.offset

    @property
    def caught_up(self) -> bool:
        """Whether the last read reached the end of the file."""
        try:
            return self.path.stat().st_size <= self.offset
        except FileNotFoundError:
            return True


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the run directory ``path``; errors are the reader's (one line, exit 2)."""
    try:
        manifest = json.loads((path / schema.MANIFEST).read_text(encoding="utf-8"))
        version = manifest.get("schema_version")
        if isinstance(version, int) and version <= schema.SCHEMA_VERSION:
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    read_run(path)  # raises the error that says what is wrong with the directory
    raise CockpitError(f"{path} cannot be read as a run directory", "pass a directory written by `cockpit run`")


class RunFollower:
    """Keeps a :class:`DashboardState` in step with a run directory.

    Args:
        path: The run directory.
    """

    def __init__(self, path: Path):
        self.path = path
        self.manifest = read_manifest(path)
        self._start_over()

    def _start_over(self) -> None:
        """Show the run from its first record again, with nothing kept from what was shown."""
        self.state = DashboardState()
        self.state.start(RunInfo.from_mapping(self.manifest, run_dir=str(self.path)))
        self.steps = JsonLinesFollower(self.path / schema.STEPS)
        self.evals = JsonLinesFollower(self.path / schema.EVALS)
        self.warnings_shown: set[str] = set()

    @property
    def running(self) -> bool:
        return self.manifest.get("status") == "running"

    def poll(self) -> None:
        """Read what was appended (everything, in chunks) and the manifest's status."""
        try:
            self.manifest = read_manifest(self.path)
        except CockpitError:
            pass  # being rewritten: keep the last good one
        if self.steps.rewritten() or self.evals.rewritten():  # resumed from a checkpoint: its records were cut back
            self._start_over()
        for text in self.manifest.get("warnings") or []:  # written as they arise (a quantity switched off)
            if isinstance(text, str) and text not in self.warnings_shown:
                self.warnings_shown.add(text)
                self.state.add_warning(text)
        for follower, feed in ((self.evals, self.state.add_eval_record), (self.steps, self.state.add_step_record)):
            while True:
                for record in follower.read():
                    try:
                        feed(record)
                    except (TypeError, ValueError, AttributeError):
                        follower.bad_lines += 1
                if follower.caught_up:
                    break
        if not self.running and self.state.status == "running":
            self._finish()
        elif self.running:
            self._check_heartbeat()

    def _finish(self) -> None:
        seconds = (self.manifest.get("timings") or {}).get("train_seconds")
        self.state.finish(str(self.manifest.get("status", "unknown")), self.manifest.get("message"), seconds)
        for follower in (self.steps, self.evals):
            if follower.partial.strip() or follower.bad_lines:
                self.state.add_alert("info", f"{follower.path.name}: a cut-off or unreadable line was ignored", key=f"cut:{follower.path.name}")

    def _check_heartbeat(self) -> None:
        try:
            beat = datetime.fromisoformat(str(self.manifest.get("heartbeat_at")))
        except ValueError:
            return
        silent = (datetime.now(timezone.utc) - beat).total_seconds()
        if silent > STALE_SECONDS:
            self.state.add_alert("warning", f"no heartbeat for {silent:.0f}s: the training process may have stopped", key="stale")


def _being_created(path: Path) -> bool:
    """Whether ``path`` may still become a run directory: absent, or empty and without a manifest yet."""
    if not path.exists():
        return True
    return path.is_dir() and not (path / schema.MANIFEST).exists() and not any(path.iterdir())


def wait_for_run(path: Path, console: Console, interval: float) -> bool:
    """Wait up to :data:`APPEAR_SECONDS` for a run being started to create ``path`` (a watch
    started together with its run would otherwise find nothing yet). Returns ``False`` on
    Ctrl-C; after the wait, whatever is there is read (and a missing run is the usual error)."""
    if not _being_created(path):
        return True
    console.print(f"waiting for {path} to appear (a run being started creates it; Ctrl-C to stop)", style="dim")
    deadline = time.monotonic() + APPEAR_SECONDS
    try:
        while _being_created(path) and time.monotonic() < deadline:
            time.sleep(interval)
    except KeyboardInterrupt:
        return False
    return True


def watch_run(path: Path, console: Console, follow: bool | None = None, interval: float = 1.0) -> ExitCode:
    """Show the dashboard of the run in ``path``; follow it while it runs (or with ``follow``).

    Without ``follow`` a finished run is drawn once. On a terminal the dashboard is live while
    following; otherwise it is printed once, when following ends. Ctrl-C ends following. Unless
    ``follow`` is ``False``, a run directory that does not exist yet is waited for.
    """
    if follow is not False and not wait_for_run(path, console, interval):
        return ExitCode.INTERRUPTED
    follower = RunFollower(path)
    follower.poll()
    lock = threading.Lock()

    def view() -> DashboardView:
        with lock:
            return DashboardView(follower.state.snapshot(), fit_height=True)

    def follow_until_done() -> None:
        while follow or follower.running:
            time.sleep(interval)
            with lock:
                follower.poll()

    try:
        if (follow if follow is not None else follower.running):
            if console.is_terminal:
                with Live(console=console, get_renderable=view, auto_refresh=True, refresh_per_second=4, transient=True):
                    follow_until_done()
            else:
                follow_until_done()
    except KeyboardInterrupt:
        pass
    console.print(DashboardView(follower.state.snapshot()))
    console.print(summary(follower.state.snapshot(), str(path)))
    return ExitCode.OK
