"""Series of values over steps, and the windows rules take their medians over.

Windows are fractions of the tracked points, so the same rule fits a run of 50 tracked steps
and one of 10,000, and a run that is still growing (live diagnosis).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

MIN_WINDOW = 5  # fewest points a window holds (when the series has that many)
RECENT = 0.5  # "recent" = the last half of the tracked points
EARLY = 0.1  # "early" = the first tenth of the tracked points
SAMPLE = 1000  # per-parameter windows are thinned to this many evenly spread points


def finite_median(values: Sequence[Any]) -> float:
    """Median of the finite values (floats or ``None``); ``nan`` when there are none."""
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(statistics.median(finite)) if finite else math.nan


@dataclass(frozen=True)
class Series:
    """Values at steps, in step order.

    Attributes:
        steps: The steps (ascending).
        values: One value per step (usually a float; any JSON value for raw series).
    """

    steps: Sequence[int]
    values: Sequence[Any]

    def __len__(self) -> int:
        return len(self.values)

    def _slice(self, start: int, stop: int) -> Series:
        return type(self)(self.steps[start:stop], self.values[start:stop])

    def last(self, fraction: float = RECENT, min_points: int = MIN_WINDOW) -> Series:
        """The last ``fraction`` of the points (at least ``min_points``)."""
        count = max(min_points, math.ceil(fraction * len(self)))
        return self._slice(max(0, len(self) - count), len(self))

    def recent(self) -> Series:
        """The last :data:`RECENT` of the points, thinned to at most :data:`SAMPLE` points."""
        return self.last().sample(SAMPLE)

    def first(self, fraction: float = EARLY, min_points: int = MIN_WINDOW) -> Series:
        """The first ``fraction`` of the points (at least ``min_points``)."""
        return self._slice(0, max(min_points, math.ceil(fraction * len(self))))

    def between(self, start: float, stop: float) -> Series:
        """The points from fraction ``start`` to fraction ``stop`` of the series (at least one)."""
        low = min(int(start * len(self)), max(len(self) - 1, 0))
        return self._slice(low, max(low + 1, math.ceil(stop * len(self))))

    def sample(self, count: int) -> Series:
        """At most ``count`` points spread evenly, the last point included."""
        if len(self) <= count:
            return self
        indices = [len(self) - 1 - round(i * (len(self) - 1) / (count - 1)) for i in range(count)][::-1]
        return type(self)([self.steps[i] for i in indices], [self.values[i] for i in indices])

    def map(self, function: Callable[[Any], float]) -> Series:
        """A new series with ``function`` applied to every value."""
        return Series(self.steps, [function(value) for value in self.values])

    def median(self) -> float:
        """Median of the finite values (``nan`` when there are none)."""
        return finite_median(self.values)

    def fraction(self, predicate: Callable[[Any], bool]) -> float:
        """Share of the points whose value satisfies ``predicate`` (0 for an empty series)."""
        return sum(1 for value in self.values if predicate(value)) / len(self) if len(self) else 0.0

    def span(self) -> tuple[int, int]:
        """First and last step of the series ((0, 0) when empty)."""
        return (int(self.steps[0]), int(self.steps[-1])) if len(self) else (0, 0)


@dataclass(frozen=True)
class Table(Series):
    """A series whose values are rows of numbers (one per parameter or per layer)."""

    @property
    def rows(self) -> Sequence[list[float]]:
        return self.values

    def column(self, index: int) -> Series:
        """The ``index``-th entry of every row that has one."""
        pairs = [(step, row[index]) for step, row in zip(self.steps, self.values) if index < len(row)]
        return Series([step for step, _ in pairs], [value for _, value in pairs])

    def width(self) -> int:
        """Length of the last row (0 when empty)."""
        return len(self.values[-1]) if len(self) else 0
