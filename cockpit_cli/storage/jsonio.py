"""Small JSON helpers: atomic whole-file writes and a JSON Lines appender.

Non-finite floats are written as JSON's ``NaN`` / ``Infinity`` tokens (what Python's ``json``
and ``pandas.read_json`` accept), so a diverged step keeps its value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and a rename (never half-written)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class JsonLinesAppender:
    """Appends one JSON object per line and flushes each, so a killed process loses nothing.

    Args:
        path: The ``.jsonl`` file; created if missing, appended to otherwise.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle: IO[str] | None = open(path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            raise ValueError(f"{self.path} is closed")
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file; a failure to flush on close (full disk) is left to the last append's error."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except OSError:
                pass
