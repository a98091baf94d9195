"""The one user-facing error type and the process exit codes.

Library code raises :class:`CockpitError`; only the command-line layer catches it, prints
``error: <message>`` plus the hint, and exits with the error's code.
"""

from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Iterable


class ExitCode(IntEnum):
    """Exit codes of the ``cockpit`` command."""

    OK = 0
    FAILURE = 1  # the command ran but found a problem (e.g. a diverged run)
    BAD_INPUT = 2  # the user's input (config, paths, arguments) is wrong
    INTERRUPTED = 130  # Ctrl-C


class OutputClosed(SystemExit):
    """Standard output went away: its reader ended (``cockpit run ... | head``). The command ends
    quietly with exit code 1, as Rich's consoles do, and a run records this as why it stopped."""

    message = "its standard output was closed (the program reading it ended)"


class CockpitError(Exception):
    """An error the user can fix: what is wrong, and how to fix it.

    Args:
        message: One line saying what is wrong.
        hint: One line saying how to fix it (optional).
        code: The exit code the command line uses for it.
    """

    def __init__(self, message: str, hint: str | None = None, code: ExitCode = ExitCode.BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class PeerStopped(CockpitError):
    """Another process of a data-parallel run stopped (it failed, or its launcher ended it).

    The process that failed prints its own error; the others only end.
    """

    def __init__(self, rank: int, world_size: int, step: int | None):
        when = f"at step {step}" if step is not None else "before training"
        super().__init__(
            f"another process of this run stopped {when}; process {rank} of {world_size} ended with it",
            "the process that failed says why in its own error line; the records up to that step are kept",
            ExitCode.FAILURE,
        )


def did_you_mean(name: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest known name, or ``""`` if none is close
    (similarity at least ``cutoff``, in ``difflib``'s ratio)."""
    matches = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def unknown_name_error(kind: str, name: str, known: Iterable[str], list_command: str | None = None) -> CockpitError:
    """Build the standard error for an unknown registry name.

    Args:
        kind: What the name is (``"problem"``, ``"optimizer"``, ...).
        name: The name the user gave.
        known: All valid names.
        list_command: A command that lists the valid names, if there is one.
    """
    known = sorted(known)
    message = f"{kind} '{name}' is unknown{did_you_mean(name, known)}"
    if list_command:
        hint = f"`{list_command}` lists all"
    else:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        hint = f"known: {shown}"
    return CockpitError(message, hint)
