"""Writes a run directory while training runs (an observer of the training loop).

Layout (see the README for every field)::

    <run>/run.json       manifest, rewritten atomically at start, on a heartbeat, at the end
    <run>/config.yaml    the effective config
    <run>/steps.jsonl    one line per step, flushed as written
    <run>/evals.jsonl    one line per evaluation, flushed as written
    <run>/summary.json   written at the end
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from cockpit_cli.config import is_safe_name
from cockpit_cli.errors import CockpitError, ExitCode
from cockpit_cli.storage import schema
from cockpit_cli.storage.jsonio import JsonLinesAppender, write_json_atomic, write_text_atomic
from cockpit_cli.storage.summary import summarize
from cockpit_cli.training.events import EvalRecord, RunEnd, RunMeta, RunStatus, StepRecord


def now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_name(problem: str, optimizer: str) -> str:
    """Return ``<problem>_<optimizer>_<YYYYmmdd-HHMMSS>`` (local time)."""
    return f"{problem}_{optimizer.lower()}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# The run directories that writers of this process hold (created and not yet ended): a lock
# with this process's pid on another one was written by an earlier process of the same number
# (a container's, whose processes count from 1 again).
_HELD_HERE: set[Path] = set()


def lock_holder(run_dir: Path) -> int | None:
    """Return the pid of a live process holding the run's lock, or ``None`` (no lock, or a
    writer that is gone)."""
    try:
        pid = int((run_dir / schema.LOCK).read_text(encoding="utf-8").strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    if pid == os.getpid() and run_dir.resolve() not in _HELD_HERE:
        return None
    return pid


def reopen_run_directory(run_dir: Path, keep_steps_below: int, keep_evals_through: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prepare a run directory for resuming: cut records written after the checkpoint.

    Args:
        run_dir: The run to continue.
        keep_steps_below: Step records from this step on are dropped (they will be written again).
        keep_evals_through: Evaluations after this step are dropped.

    Returns:
        The step and evaluation records kept (for the live view and the summary).

    Raises:
        CockpitError: another live process writes the directory.
    """
    holder = lock_holder(run_dir)
    if holder is not None and holder != os.getpid():
        raise CockpitError(f"run directory {run_dir} is being written by process {holder}", "wait for it to finish, or stop it first")
    from cockpit_cli.storage.reader import read_json_lines

    notes: list[str] = []
    steps = [r for r in read_json_lines(run_dir / schema.STEPS, notes) if r.get("step", 0) < keep_steps_below]
    evals = [r for r in read_json_lines(run_dir / schema.EVALS, notes) if r.get("step", 0) <= keep_evals_through]
    for name, records in ((schema.STEPS, steps), (schema.EVALS, evals)):
        write_text_atomic(run_dir / name, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return steps, evals


def close_abandoned_run(run_dir: Path, status: RunStatus, message: str) -> bool:
    """Mark a run whose writer was killed before it could say how it ended.

    Nothing changes unless ``run.json`` still says ``running`` and no live process holds the
    lock. The records on disk are kept as they are.

    Returns:
        Whether the manifest was changed.
    """
    path = run_dir / schema.MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("status") != RunStatus.RUNNING.value or lock_holder(run_dir) is not None:
        return False
    manifest.update(status=status.value, message=message, ended_at=now_iso())
    write_json_atomic(path, manifest)
    (run_dir / schema.LOCK).unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class DirectoryAdvice:
    """How to fix a run directory that cannot be created, in the words of the interface that
    named it (the defaults: the command line's)."""

    parent: str = "choose a writable output.directory or --out"
    name: str = "choose another --name"
    overwrite: str = "pass --overwrite to replace it, or choose another --name"
    held_here: str = "end that run first"


def prepare_run_directory(parent: Path, name: str, overwrite: bool = False, advice: DirectoryAdvice = DirectoryAdvice()) -> Path:
    """Create ``parent/name`` for a new run and return it.

    Raises:
        CockpitError: unsafe name, parent not a writable directory, or the run directory exists
            (unless ``overwrite``; even then only a previous run directory or an empty one is removed).
    """
    if not is_safe_name(name):
        raise CockpitError(f"run name {name!r} is not a safe directory name", "use letters, digits, '.', '_' and '-' only")
    if parent.exists() and not parent.is_dir():
        raise CockpitError(f"output directory {parent} is a file, not a directory", advice.parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CockpitError(f"cannot create output directory {parent}: {error.strerror}", advice.parent) from None
    if not os.access(parent, os.W_OK):
        raise CockpitError(f"output directory {parent} is not writable", advice.parent)
    run_dir = parent / name
    if run_dir.exists():
        if not overwrite:
            raise CockpitError(f"run directory {run_dir} already exists", advice.overwrite)
        is_run = (run_dir / schema.MANIFEST).exists()
        if not run_dir.is_dir() or not (is_run or not any(run_dir.iterdir())):
            raise CockpitError(f"{run_dir} exists and is not a run directory; refusing to overwrite it", advice.name)
        holder = lock_holder(run_dir)
        if holder == os.getpid():
            raise CockpitError(f"run directory {run_dir} is being written by a run of this process", advice.held_here)
        if holder is not None:
            raise CockpitError(f"run directory {run_dir} is being written by process {holder}", "wait for it to finish, or stop it first")
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    return run_dir


class RunWriter:
    """Observer that records a run into ``run_dir``.

    Args:
        run_dir: A fresh directory from :func:`prepare_run_directory`.
        config: The effective config as a plain mapping.
        config_yaml: The same config as YAML text (saved verbatim).
        command: The command line that started the run.
        resume_evals: When continuing a run (``cockpit run --resume``), the evaluations it kept;
            the files are then appended to rather than started.
    """

    def __init__(
        self, run_dir: Path, config: dict[str, Any], config_yaml: str, command: list[str] | None = None, resume_evals: list[dict[str, Any]] | None = None
    ):
        resume = resume_evals is not None
        self.run_dir = run_dir
        self._lock = run_dir / schema.LOCK
        self._lock.write_text(f"{os.getpid()}\n", encoding="utf-8")
        _HELD_HERE.add(run_dir.resolve())
        if not resume:
            write_text_atomic(run_dir / schema.CONFIG, config_yaml)
        self.manifest: dict[str, Any] = {
            "schema_version": schema.SCHEMA_VERSION,
            "status": RunStatus.RUNNING.value,
            "created_at": now_iso(),
            "heartbeat_at": now_iso(),
            "ended_at": None,
            "message": None,
            "problem": config.get("problem", {}).get("name"),
            "optimizer": config.get("optimizer", {}).get("name"),
            "seed": config.get("training", {}).get("seed"),
            "command": command or sys.argv,
            "steps_completed": 0,
            "epochs_completed": 0,
            "timings": {"started": time.time()},
        }
        if resume:
            previous = json.loads((run_dir / schema.MANIFEST).read_text(encoding="utf-8"))
            self.manifest.update({key: previous[key] for key in ("created_at", "timings", "command") if key in previous})  # the run's start
            self.manifest["resumed_at"] = [*previous.get("resumed_at", []), now_iso()]
        self._steps = JsonLinesAppender(run_dir / schema.STEPS)
        self._evals = JsonLinesAppender(run_dir / schema.EVALS)
        self._eval_records: list[dict[str, Any]] = list(resume_evals or [])
        self._recent_losses: deque[float] = deque(maxlen=50)
        self._last_heartbeat = 0.0
        self.broken = False
        self._write_manifest()

    def on_start(self, meta: RunMeta) -> None:
        self.manifest.update(
            device=meta.device,
            batch_size=meta.batch_size,
            total_steps=meta.total_steps,
            steps_per_epoch=meta.steps_per_epoch,
            num_parameters=meta.num_parameters,
            versions=meta.versions,
            instruments=meta.instruments,
            notes=meta.notes,
            processes=meta.processes,
        )
        self._write_manifest()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed write (full disk, vanished directory) into one clear error."""
        try:
            yield
        except OSError as error:
            self.broken = True
            reason = error.strerror or type(error).__name__
            raise CockpitError(
                f"cannot write the run directory {self.run_dir}: {reason}",
                "free disk space or check that the directory still exists; everything written before is intact",
                ExitCode.FAILURE,
            ) from None

    def on_step(self, record: StepRecord) -> None:
        with self._writing():
            self._append_step(record)

    def _append_step(self, record: StepRecord) -> None:
        self._steps.append(record.to_dict())
        self._recent_losses.append(record.loss)
        self.manifest["steps_completed"] = record.step + 1
        self.manifest["epochs_completed"] = record.epoch
        if time.monotonic() - self._last_heartbeat > schema.HEARTBEAT_SECONDS:
            self._write_manifest()

    def on_eval(self, record: EvalRecord) -> None:
        data = record.to_dict()
        with self._writing():
            self._evals.append(data)
            self._eval_records.append(data)
            self._write_manifest()

    def on_batch_size(self, size: int, micro_batch_size: int | None = None, micro_batches: int | None = None) -> None:
        """Record the batch size where the start did not know it (a loop of the Python API); where
        a step accumulates gradients over micro-batches, the size of its first (the one its
        per-sample values describe) and their number."""
        self.manifest["batch_size"] = size
        if micro_batch_size is not None:
            self.manifest["micro_batch_size"], self.manifest["micro_batches"] = micro_batch_size, micro_batches
        with self._writing():
            self._write_manifest()

    def on_warning(self, text: str) -> None:
        """Record a warning in the manifest when it arises (the end replaces the list with all of them)."""
        self.manifest.setdefault("warnings", []).append(text)
        with self._writing():
            self._write_manifest()

    def on_end(self, end: RunEnd) -> None:
        # The records on disk are the truth: an interruption can fall between a step's update and
        # its record, so count what was written rather than what the loop counted.
        steps = self.manifest["steps_completed"] if self.manifest["steps_completed"] else end.steps
        self._steps.close()
        self._evals.close()
        self.manifest.update(
            status=end.status.value,
            message=end.message,
            ended_at=now_iso(),
            steps_completed=steps,
            epochs_completed=end.epochs,
            warnings=end.warnings,
        )
        if end.instruments:  # with the quantities switched off during the run, and why
            self.manifest["instruments"] = end.instruments
        self.manifest["timings"]["train_seconds"] = round(end.train_seconds, 3)
        summary = summarize(end.status.value, end.message, steps, end.epochs, end.train_seconds, list(self._recent_losses), self._eval_records)
        try:
            write_json_atomic(self.run_dir / schema.SUMMARY, summary)
            self._write_manifest()
            self._lock.unlink(missing_ok=True)
            _HELD_HERE.discard(self.run_dir.resolve())
        except OSError:
            if not self.broken:  # the first failure was reported already; keep that message
                raise

    def _write_manifest(self) -> None:
        self.manifest["heartbeat_at"] = now_iso()
        self._last_heartbeat = time.monotonic()
        write_json_atomic(self.run_dir / schema.MANIFEST, self.manifest)

