"""Reads a run directory into :class:`RunData` (plain Python; no torch).

The reader is forgiving where a crash can leave marks (a cut-off last line of a JSON Lines
file is skipped with a note; a missing summary is fine), notes where records are missing (fewer
step records than the manifest counts), and is strict where the directory is not a run at all
(no or corrupt manifest, a schema from a newer version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cockpit_cli.errors import CockpitError
from cockpit_cli.storage import schema

try:  # a fast parser where installed; it rejects the NaN tokens of diverged steps, json takes those
    from orjson import JSONDecodeError as _FastError
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a dependency, but reading must never need it
    _fast_loads, _FastError = json.loads, json.JSONDecodeError


def parse_line(line: str) -> object:
    """Parse one JSON Lines record (fast path first; ``NaN`` / ``Infinity`` through ``json``)."""
    try:
        return _fast_loads(line)
    except _FastError:
        return json.loads(line)


CRASHED_OR_RUNNING = "crashed or still running"
# A running run rewrites its manifest at least every HEARTBEAT_SECONDS while it takes steps; a
# heartbeat this much older means the process died (or is stuck in one very long step).
STALE_HEARTBEAT_SECONDS = 6 * schema.HEARTBEAT_SECONDS


def heartbeat_is_stale(manifest: dict[str, Any], now: datetime | None = None) -> bool:
    """Return whether the manifest's ``heartbeat_at`` is older than :data:`STALE_HEARTBEAT_SECONDS`."""
    try:
        beat = datetime.fromisoformat(str(manifest.get("heartbeat_at")))
    except ValueError:
        return False
    now = now or datetime.now(timezone.utc)
    return (now - beat).total_seconds() > STALE_HEARTBEAT_SECONDS


@dataclass
class RunData:
    """Everything a run directory holds, as plain data.

    Attributes:
        path: The run directory.
        manifest: ``run.json``.
        config: ``config.yaml`` as a mapping (empty if missing).
        steps: ``steps.jsonl``, one dict per step, in order.
        evals: ``evals.jsonl``, one dict per evaluation, in order.
        summary: ``summary.json``, or ``None`` while the run has not ended.
        notes: Things the reader had to work around (a cut-off last line, missing records).
    """

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The manifest's status; a ``running`` run whose heartbeat is stale reads as crashed or still running."""
        status = str(self.manifest.get("status", "unknown"))
        return CRASHED_OR_RUNNING if status == "running" and heartbeat_is_stale(self.manifest) else status

    @property
    def name(self) -> str:
        return self.path.name


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CockpitError(f"{path} is corrupted: its {what} is not valid JSON", "the run directory cannot be read; rerun the training") from None


def read_json_lines(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Read a JSON Lines file; a cut-off last line is skipped and noted, a bad middle line is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_line(line)
        except json.JSONDecodeError:
            if number == len(lines):
                notes.append(f"{path.name}: the last line (line {number}) is cut off and was ignored")
                continue
            raise CockpitError(f"{path} is corrupted at line {number}", "only a cut-off last line can be skipped; rerun the training") from None
        if not isinstance(record, dict):
            raise CockpitError(f"{path} is corrupted at line {number}: expected a JSON object")
        records.append(record)
    return records


def read_run(path: Path | str) -> RunData:
    """Read the run directory at ``path``.

    Raises:
        CockpitError: not a directory, no or corrupt manifest, or a schema version newer than
            this program understands.
    """
    path = Path(path)
    if not path.exists():
        raise CockpitError(f"run directory {path} does not exist", "check the path (runs are written under results/ by default)")
    if not path.is_dir():
        raise CockpitError(f"{path} is a file, not a run directory", "pass the directory that holds run.json")
    manifest_path = path / schema.MANIFEST
    if not manifest_path.exists():
        raise CockpitError(f"{path} is not a run directory: it has no {schema.MANIFEST}", "pass a directory written by `cockpit run`")
    manifest = _read_json_file(manifest_path, "manifest")
    if not isinstance(manifest, dict):
        raise CockpitError(f"{manifest_path} is corrupted: expected a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise CockpitError(f"{manifest_path} has no valid schema_version", "the run directory is corrupted")
    if version > schema.SCHEMA_VERSION:
        raise CockpitError(
            f"{path} was written with run-directory schema {version}, newer than this cockpit understands ({schema.SCHEMA_VERSION})",
            "upgrade cockpit (pip install -U cockpit-cli)",
        )
    notes: list[str] = []
    config: dict[str, Any] = {}
    config_path = path / schema.CONFIG
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            notes.append(f"{schema.CONFIG} is not valid YAML and was ignored")
    summary_path = path / schema.SUMMARY
    summary = _read_json_file(summary_path, "summary") if summary_path.exists() else None
    steps = read_json_lines(path / schema.STEPS, notes)
    evals = read_json_lines(path / schema.EVALS, notes)
    recorded = manifest.get("steps_completed")
    if isinstance(recorded, int) and len(steps) < recorded:  # the manifest is written after the records: never fewer
        notes.append(f"{schema.STEPS} holds {len(steps)} of the {recorded} steps the run recorded: records were lost, and what follows uses those left")
    return RunData(path=path, manifest=manifest, config=config, steps=steps, evals=evals, summary=summary, notes=notes)
