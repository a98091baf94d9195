"""Arranging the panels: the Cockpit figure's three columns from 100 columns up, else one column."""

from __future__ import annotations

import time

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.rule import Rule
from rich.segment import Segment

from cockpit_cli.display import panels
from cockpit_cli.display.panels.common import COLUMN_STYLE
from cockpit_cli.display.state import DashboardState

WIDE_MIN_WIDTH = 100


def _column(title: str, key: str, *parts: RenderableType) -> Group:
    return Group(Rule(f"[bold]{title}[/]", style=COLUMN_STYLE[key], characters="━"), *parts)


class Row:
    """Renderables side by side with widths in proportion to ``ratios``, each rendered once.

    Unlike a table grid, it never measures its cells, which keeps a full redraw cheap.
    """

    def __init__(self, parts: list[RenderableType], ratios: list[int], gap: int = 1):
        self.parts, self.ratios, self.gap = parts, ratios, gap

    def widths(self, total: int) -> list[int]:
        """Split ``total`` minus the gaps in proportion to the ratios (the last part takes the rest)."""
        space = total - self.gap * (len(self.parts) - 1)
        widths = [space * ratio // sum(self.ratios) for ratio in self.ratios[:-1]]
        return [*widths, space - sum(widths)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self.widths(options.max_width)
        blocks = [console.render_lines(part, options.update(width=width, height=None), pad=True) for part, width in zip(self.parts, widths)]
        height = max(len(block) for block in blocks)
        gap = Segment(" " * self.gap)
        for index in range(height):
            for number, (block, width) in enumerate(zip(blocks, widths)):
                if number:
                    yield gap
                yield from block[index] if index < len(block) else [Segment(" " * width)]
            yield Segment.line()


def wide(state: DashboardState) -> RenderableType:
    """Header; STEP SIZE, GRADIENTS and CURVATURE columns; hyperparameters, performance, alerts."""
    columns = Row(
        [
            _column("STEP SIZE", "step size", panels.alpha(state), panels.distance(state), panels.grad_norm(state)),
            _column("GRADIENTS", "gradients", panels.grad_tests(state), panels.grad_hist(state), panels.layers(state)),
            _column("CURVATURE", "curvature", panels.hess_max_ev(state), panels.hess_trace(state), panels.tic(state)),
        ],
        [9, 12, 10],
    )
    bottom = Row([panels.hyperparameters(state), panels.performance(state), panels.alerts(state)], [1, 2, 1])
    return Group(panels.header(state), columns, bottom)


def compact(state: DashboardState) -> RenderableType:
    """Header, one table of every instrument, alerts and the latest evaluations."""
    return Group(panels.header(state, narrow=True), panels.compact(state), panels.alerts(state, limit=3), panels.performance(state, evaluations=2))


class DashboardView:
    """The whole dashboard; picks its arrangement from the width (and height) it is given.

    Args:
        state: What to show (a snapshot that nothing changes while it is drawn).
        fit_height: Fall back to the compact arrangement when the wide one is taller than the
            terminal (for the live screen; a printed dashboard may be as tall as it needs).
    """

    def __init__(self, state: DashboardState, fit_height: bool = False):
        self.state, self.fit_height = state, fit_height
        self.draw_seconds = 0.0  # how long drawing took (the caller paces its redraws by it)
        self._drawn: dict[tuple[int, int], list[list[Segment]]] = {}  # drawn once per size

    def lines(self, console: Console, options: ConsoleOptions) -> list[list[Segment]]:
        """The dashboard drawn at the width (and, with ``fit_height``, height) of ``options``."""
        key = (options.max_width, options.size.height if self.fit_height else 0)
        if key not in self._drawn:
            began = time.perf_counter()
            unbounded = options.update(height=None, no_wrap=False, overflow="fold")  # wrap even on a soft-wrapping console
            lines = console.render_lines(wide(self.state), unbounded, pad=False) if options.max_width >= WIDE_MIN_WIDTH else None
            if lines is None or (self.fit_height and len(lines) > options.size.height):
                lines = console.render_lines(compact(self.state), unbounded, pad=False)
            self._drawn = {key: lines}
            self.draw_seconds = time.perf_counter() - began
        return self._drawn[key]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines(console, options):
            yield from line
            yield Segment.line()
