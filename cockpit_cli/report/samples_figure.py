"""``samples.png``: how each tracked validation sample fared at each evaluation.

Left, one row per sample and one column per evaluation (correct / wrong / not evaluated), the
samples sorted by when they were learned for good; samples wrong at the end that were once right
(forgotten) and samples never classified correctly are grouped below, and a strip counts each
sample's forgetting events (correct, then wrong at the next evaluation). Right, the shares of
samples correct, learned for good and forgotten at least once, over the evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cockpit_cli.report.data import RunView, SampleOutcomes
from cockpit_cli.report.plotting import BASE_FONT_SIZE, PRIMARY, SECONDARY, TERTIARY, empty_panel, figure_title, new_figure, save, style
from cockpit_cli.storage.schema import from_api

OUTCOME_COLORS = ListedColormap(["#e57373", "#43a047", "#dddddd"])  # wrong, correct, not evaluated
CODES = {"0": 0, "1": 1}
GROUPS = ("learned", "forgotten by the end", "never learned")
NO_SAMPLES = "no per-sample outcomes recorded: they need evaluations with an accuracy and training.track_samples > 0"
NO_SAMPLES_OF_API = "no per-sample outcomes: a run of the Python API records each split's loss and accuracy (run.evaluate), not each sample's outcome"


@dataclass(frozen=True)
class SampleHistory:
    """What happened to one sample over the evaluations.

    Attributes:
        index: Position of the sample among the tracked ones.
        learned_at: First evaluation from which it stays correct (``None``: wrong at the end).
        forgettings: How often it went from correct to wrong between evaluations.
        group: One of :data:`GROUPS`.
    """

    index: int
    learned_at: int | None
    forgettings: int
    group: str


def history(index: int, outcomes: str) -> SampleHistory:
    """Summarise one sample's outcome string (``1`` correct, ``0`` wrong, ``?`` not evaluated)."""
    evaluated = [(column, char) for column, char in enumerate(outcomes) if char in CODES]
    forgettings = sum(1 for (_, a), (_, b) in zip(evaluated, evaluated[1:]) if a == "1" and b == "0")
    learned_at = None
    for column, char in reversed(evaluated):
        if char != "1":
            break
        learned_at = column
    if learned_at is not None:
        group = GROUPS[0]
    else:
        group = GROUPS[1] if any(char == "1" for _, char in evaluated) else GROUPS[2]
    return SampleHistory(index, learned_at, forgettings, group)


def sort_samples(outcomes: SampleOutcomes) -> list[SampleHistory]:
    """Histories of every sample: learned ones by when, then forgotten ones, then never learned."""
    histories = [history(index, row) for index, row in enumerate(outcomes.rows)]
    width = len(outcomes.steps)
    return sorted(histories, key=lambda h: (GROUPS.index(h.group), h.learned_at if h.learned_at is not None else width, -h.forgettings, h.index))


def _shares(outcomes: SampleOutcomes, matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per evaluation: % correct, % learned for good by then, % forgotten at least once by then."""
    histories = [history(index, row) for index, row in enumerate(outcomes.rows)]
    columns = np.arange(matrix.shape[1])
    learned = np.array([[h.learned_at is not None and h.learned_at <= c for c in columns] for h in histories])
    forgotten = np.zeros_like(matrix, dtype=bool)
    for column in range(1, matrix.shape[1]):
        forgotten[:, column] = forgotten[:, column - 1] | ((matrix[:, column - 1] == 1) & (matrix[:, column] == 0))
    count = max(len(histories), 1)
    return {
        "correct": 100 * (matrix == 1).sum(axis=0) / count,
        "learned for good": 100 * learned.sum(axis=0) / count,
        "forgotten at least once": 100 * forgotten.sum(axis=0) / count,
    }


def samples_figure(view: RunView) -> Figure:
    """Build the per-sample figure of ``view``."""
    figure = new_figure(16, 9)
    title = f"Tracked validation samples of {view.run.name}: {view.run.manifest.get('problem', '?')} with {view.optimizer}"
    figure_title(figure, title, view.run.manifest)
    outcomes = view.samples()
    if not outcomes.rows:
        empty_panel(figure.add_subplot(1, 1, 1), "Per-sample outcomes", NO_SAMPLES_OF_API if from_api(view.run.manifest) else NO_SAMPLES)
        return figure
    order = sort_samples(outcomes)
    matrix = np.array([[CODES.get(char, 2) for char in row] for row in outcomes.rows])
    grid = figure.add_gridspec(1, 3, width_ratios=[3, 0.18, 2.2], wspace=0.08, left=0.1, right=0.97, top=0.88, bottom=0.1)
    ax = figure.add_subplot(grid[0, 0])
    sorted_matrix = matrix[[h.index for h in order]]
    ax.imshow(sorted_matrix, aspect="auto", cmap=OUTCOME_COLORS, vmin=0, vmax=2, interpolation="nearest")
    ticks = np.unique(np.linspace(0, len(outcomes.steps) - 1, min(len(outcomes.steps), 12)).round().astype(int))
    ax.set_xticks(ticks, [str(outcomes.steps[i]) for i in ticks])
    style(ax, f"Outcome per sample and evaluation ({len(order)} samples, sorted by when learned)", "evaluation after training step")
    ax.grid(False)
    start = 0
    for group in GROUPS:
        size = sum(1 for h in order if h.group == group)
        if size:
            ax.axhline(start - 0.5, color="black", lw=1)
            upright = size >= 0.15 * len(order)
            ax.text(-0.012, start + size / 2, f"{group} ({size})", transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=BASE_FONT_SIZE - 1, rotation=90 if upright else 0)
        start += size
    ax.set_yticks([])
    ax.legend(
        handles=[Patch(color=OUTCOME_COLORS(i), label=label) for i, label in enumerate(("wrong", "correct", "not evaluated"))],
        loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=BASE_FONT_SIZE - 1, frameon=False,
    )
    strip = figure.add_subplot(grid[0, 1], sharey=ax)
    counts = np.array([[h.forgettings] for h in order])
    strip.imshow(counts, aspect="auto", cmap="Purples", vmin=0, vmax=max(1, counts.max()), interpolation="nearest")
    strip.set_xticks([])
    strip.tick_params(labelleft=False, left=False)
    strip.set_title(f"times\nforgotten\n(max {counts.max()})", fontsize=BASE_FONT_SIZE - 1)
    _shares_panel(figure, grid[0, 2], outcomes, matrix, view.step_span())
    return figure


def _shares_panel(figure: Figure, spec: object, outcomes: SampleOutcomes, matrix: np.ndarray, span: tuple[int, int]) -> None:
    """The shares of samples correct, learned for good and forgotten, over the evaluations."""
    ax = figure.add_subplot(spec)
    for (label, values), color in zip(_shares(outcomes, matrix).items(), (TERTIARY, PRIMARY, SECONDARY)):
        ax.plot(outcomes.steps, values, marker="o", ms=4, lw=1.6, color=color, label=f"{label} ({values[-1]:.0f}% at the end)")
    never = sum(1 for row in outcomes.rows if "1" not in row)
    ax.axhline(100 * never / len(outcomes.rows), color="black", ls=":", lw=1, label=f"never learned ({100 * never / len(outcomes.rows):.0f}%)")
    ax.set_ylim(0, 100)
    margin = 0.02 * (span[1] - span[0])
    ax.set_xlim(span[0] - margin, span[1] + margin)
    style(ax, "Share of tracked samples", "evaluation after training step", "samples (%)")
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    ax.legend(fontsize=BASE_FONT_SIZE - 1, loc="upper left")


def write_samples_figure(view: RunView, path: Path) -> Path:
    """Write the per-sample figure of ``view`` to ``path``."""
    return save(samples_figure(view), path)
