"""Aligned rows of text drawn without Rich's table machinery, cheap enough for every frame."""

from __future__ import annotations

from typing import Protocol, Sequence, Union

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text


class Fill(Protocol):
    """A cell drawn to whatever width it gets (a sparkline, a progress bar)."""

    def line(self, width: int) -> Text: ...


Cell = Union[str, Text, Fill]


class Rows:
    """Rows of cells in aligned columns; one column may take whatever width is left.

    Args:
        rows: The cells of each row: text, or a :class:`Fill` (e.g. a sparkline) in the
            flexible column.
        justify: ``"left"`` or ``"right"`` per column.
        flex: Index of the column that takes the remaining width (its text is cut with an
            ellipsis where too long); ``None`` packs the columns to the left.
        header: Column titles, drawn dim above the rows.
        gap: Spaces between columns.
        styles: A style per column for cells given as plain strings.
    """

    def __init__(
        self,
        rows: Sequence[Sequence[Cell]],
        justify: Sequence[str],
        flex: int | None = None,
        header: Sequence[str] | None = None,
        gap: int = 1,
        styles: Sequence[str] | None = None,
    ):
        self.rows, self.justify, self.flex, self.header, self.gap = rows, justify, flex, header, gap
        self.styles = styles or [""] * len(justify)

    def _text(self, cell: Cell, column: int) -> Text:
        if isinstance(cell, Text):
            return cell
        return Text(str(cell), style=self.styles[column])

    def _widths(self, lines: list[list[Cell]]) -> list[int]:
        return [
            max((self._text(row[i], i).cell_len for row in lines if i < len(row) and not hasattr(row[i], "line")), default=0)
            for i in range(len(self.justify))
        ]

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widths = self._widths([*self.rows, *([list(self.header)] if self.header else [])])
        natural = sum(widths) + self.gap * (len(widths) - 1)
        return Measurement(min(natural, options.max_width), options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines: list[list[Cell]] = [*([[Text(h, style="dim") for h in self.header]] if self.header else []), *self.rows]
        widths = self._widths(lines)
        if self.flex is not None:
            rest = options.max_width - sum(w for i, w in enumerate(widths) if i != self.flex) - self.gap * (len(widths) - 1)
            widths[self.flex] = max(rest, 1)
        for row in lines:
            line = Text(no_wrap=True, overflow="crop")
            for column, cell in enumerate(row):
                if column:
                    line.append(" " * self.gap)
                width = widths[column]
                text = cell.line(width) if hasattr(cell, "line") else self._text(cell, column).copy()
                if text.cell_len > width:
                    text.truncate(width, overflow="ellipsis")
                text.align("right" if self.justify[column] == "right" else "left", width)
                line.append_text(text)
            line.rstrip()
            line.truncate(options.max_width)
            yield line
