"""Scalar histories and their pictures: sparklines, bars and gauges in a line of text.

A :class:`Series` keeps a coarse summary of its history next to the raw values, so that a
sparkline of a history of any length is drawn in constant time.
"""

from __future__ import annotations

import math
from array import array
from typing import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

LEVELS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"
MISSING = "×"
COARSE = 256  # a history keeps between COARSE and 2 * COARSE bucket means
TAIL = 4096  # raw values kept in a copy (for recent windows and speeds)


class Series:
    """A scalar history: every step and value in compact arrays, plus an O(1) summary.

    The summary is a coarse history of at most ``2 * COARSE`` bucket means (buckets double in
    size when it fills up) and the count. A copy made by
    :meth:`copy` keeps the summary and only the last ``TAIL`` raw values, so snapshots stay
    small however long the run is.
    """

    __slots__ = ("steps", "values", "count", "_coarse", "_bucket", "_acc", "_acc_n")

    def __init__(self) -> None:
        self.steps, self.values = array("l"), array("d")
        self.count = 0
        self._coarse, self._bucket, self._acc, self._acc_n = array("d"), 1, 0.0, 0

    def append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        self.count += 1
        self._acc += value
        self._acc_n += 1
        if self._acc_n == self._bucket:
            self._coarse.append(self._acc / self._acc_n)
            self._acc, self._acc_n = 0.0, 0
            if len(self._coarse) >= 2 * COARSE:
                pairs = self._coarse
                self._coarse = array("d", ((pairs[i] + pairs[i + 1]) / 2 for i in range(0, len(pairs), 2)))
                self._bucket *= 2

    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    def history(self) -> list[float]:
        """The whole history as at most ``2 * COARSE + 1`` bucket means (for sparklines)."""
        return [*self._coarse, *([self._acc / self._acc_n] if self._acc_n else [])]

    def tail(self, count: int) -> array:
        """The last ``count`` raw values (at most ``TAIL`` in a copy)."""
        return self.values[-count:] if count > 0 else array("d")

    def __len__(self) -> int:
        return self.count

    def copy(self, keep: int | None = None) -> Series:
        """A copy with the summary and the last ``keep`` raw values (default: ``TAIL``)."""
        keep = TAIL if keep is None else keep
        other = Series()
        other.steps, other.values = self.steps[-keep:], self.values[-keep:]
        other.count = self.count
        other._coarse, other._bucket, other._acc, other._acc_n = array("d", self._coarse), self._bucket, self._acc, self._acc_n
        return other


def downsample(values: Sequence[float], width: int) -> list[float]:
    """Average ``values`` into at most ``width`` buckets (a bucket with a NaN or inf stays so)."""
    count = len(values)
    if count <= width:
        return [float(v) for v in values]
    buckets = []
    for index in range(width):
        start, stop = index * count // width, (index + 1) * count // width
        buckets.append(sum(values[start:stop]) / (stop - start))
    return buckets


def scale(values: Sequence[float], log: bool = False) -> list[float | None]:
    """Map finite values to [0, 1] by min-max (on log10 with ``log``); others to ``None``."""
    if log:
        values = [math.log10(v) if v > 0 and math.isfinite(v) else math.nan for v in values]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [None] * len(values)
    low, high = min(finite), max(finite)
    span = high - low
    flat = span <= 1e-9 * max(abs(high), abs(low), 1e-300)  # equal up to rounding
    return [None if not math.isfinite(v) else (0.5 if flat else (v - low) / span) for v in values]


def spark(values: Sequence[float], width: int, log: bool = False, clip: tuple[float, float] | None = None) -> str:
    """Return a one-line sparkline of ``values`` at most ``width`` characters long.

    Args:
        values: The history.
        width: Characters available.
        log: Scale by log10 (non-positive values show as missing).
        clip: Limit the values to this range first, so that outliers do not flatten the rest.
    """
    if width <= 0 or not values:
        return ""
    if clip is not None:
        values = [min(max(v, clip[0]), clip[1]) if math.isfinite(v) else v for v in values]
    levels = scale(downsample(values, width), log=log)
    return "".join(MISSING if v is None else LEVELS[min(int(v * len(LEVELS)), len(LEVELS) - 1)] for v in levels)


def hbar(fraction: float, width: int) -> str:
    """Return a horizontal bar filling ``fraction`` (clipped to [0, 1]) of ``width`` cells."""
    if not math.isfinite(fraction):
        return MISSING
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[rest] if rest else "")).ljust(width)


def column_bars(heights: Sequence[float], rows: int) -> list[str]:
    """Return ``rows`` lines (top first) drawing vertical bars of ``heights`` in [0, 1]."""
    lines = []
    for row in range(rows - 1, -1, -1):
        cells = []
        for height in heights:
            eighths = int((min(max(height, 0.0), 1.0) * rows - row) * 8)
            cells.append(" " if eighths <= 0 else "█" if eighths >= 8 else LEVELS[eighths - 1])
        lines.append("".join(cells))
    return lines


def gauge(value: float | None, width: int, low: float = 0.1, high: float = 10.0, mark: float = 1.0) -> Text:
    """A log scale from ``low`` to ``high`` with ``mark`` drawn as ``│`` and the value as ``●``.

    The dot is green at or below ``mark``, yellow up to three times it, red beyond.
    """

    def position(x: float) -> int:
        fraction = (math.log10(x) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return min(max(round(fraction * (width - 1)), 0), width - 1)

    valid = value is not None and math.isfinite(value) and value > 0
    dot = position(value) if valid else -1
    style = "green" if valid and value <= mark else ("yellow" if valid and value <= 3 * mark else "red")
    text = Text(no_wrap=True)
    for index in range(width):
        if index == dot:
            text.append("●", style=f"bold {style}")
        else:
            text.append("│" if index == position(mark) else "─", style="dim")
    return text


class Sparkline:
    """A sparkline that takes the width it is given (inside a table cell or a panel).

    Args:
        values: The history to draw.
        style: Rich style of the line.
        log: Draw log10 of the values (non-positive values show as missing).
        min_width: Narrowest acceptable width.
        clip: Limit the values to this range before scaling.
    """

    def __init__(self, values: Sequence[float], style: str = "cyan", log: bool = False, min_width: int = 6, clip: tuple[float, float] | None = None):
        self.values, self.style, self.log, self.min_width, self.clip = values, style, log, min_width, clip

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.min_width, max(self.min_width, options.max_width))

    def line(self, width: int) -> Text:
        """The sparkline drawn in ``width`` characters (``·`` when there is nothing to draw)."""
        return Text(spark(self.values, width, log=self.log, clip=self.clip) or "·", style=self.style, no_wrap=True, overflow="crop")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.line(options.max_width)
