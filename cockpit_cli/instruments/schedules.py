"""When a quantity is computed: every k steps (with an offset), or at log-spaced steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Schedule:
    """A set of steps at which a quantity is tracked.

    Attributes:
        every: Track every ``every`` steps, starting at ``offset`` (linear spacing).
        offset: First tracked step (linear spacing).
        spacing: ``"linear"`` or ``"log"``; log spacing tracks ``points`` steps spread evenly in
            log(1 + step) between step 0 and ``last_step`` (dense early, sparse late).
        points: Number of log-spaced steps.
        last_step: Last step of the run (needed for log spacing).
    """

    every: int = 1
    offset: int = 0
    spacing: Literal["linear", "log"] = "linear"
    points: int = 100
    last_step: int = 0

    def __post_init__(self) -> None:
        if self.spacing == "log":
            object.__setattr__(self, "_log_steps", frozenset(log_spaced_steps(self.last_step, self.points)))

    def __call__(self, step: int) -> bool:
        """Return whether ``step`` is tracked."""
        if self.spacing == "log":
            return step in self._log_steps  # type: ignore[attr-defined]
        return step >= self.offset and (step - self.offset) % self.every == 0

    def next_step(self, step: int) -> int | None:
        """Return the first tracked step at or after ``step`` (``None`` if there is none)."""
        if self.spacing == "log":
            return min((s for s in self._log_steps if s >= step), default=None)  # type: ignore[attr-defined]
        if step <= self.offset:
            return self.offset
        return step + (-(step - self.offset)) % self.every

    def describe(self) -> str:
        """Return a short description, e.g. ``"every 4 steps from 0"``."""
        if self.spacing == "log":
            return f"{self.points} log-spaced steps up to {self.last_step}"
        return f"every {self.every} steps from {self.offset}" if self.every != 1 else f"every step from {self.offset}"


def log_spaced_steps(last_step: int, points: int) -> list[int]:
    """Return up to ``points`` distinct integer steps in ``[0, last_step]``, spaced in log(1 + step)."""
    if points <= 1 or last_step <= 0:
        return [0]
    top = math.log1p(last_step)
    return sorted({int(round(math.expm1(top * i / (points - 1)))) for i in range(points)})


SCHEDULE_KEYS = ("every", "offset", "spacing", "points")


def schedule_from_settings(settings: dict[str, Any], last_step: int, base: Schedule | None = None) -> Schedule:
    """Build a schedule from already validated settings (``every``, ``offset``, ``spacing``, ``points``).

    Keys not given come from ``base``, except ``spacing``: ``every`` / ``offset`` without it
    mean linear spacing and ``points`` alone means log spacing, so that an override is never
    silently ignored because the base uses the other spacing.
    """
    base = base or Schedule(last_step=last_step)
    values = {key: settings.get(key, getattr(base, key)) for key in SCHEDULE_KEYS}
    if "spacing" not in settings:
        if "every" in settings or "offset" in settings:
            values["spacing"] = "linear"
        elif "points" in settings:
            values["spacing"] = "log"
    return Schedule(last_step=last_step, **values)
