"""The composite instruments of the cockpit figure: the Alpha distribution, the gradient tests,
and the 1-D and 2-D gradient histograms.

Each gauge draws into one grid cell of the figure and says so in place when it has no data.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.gridspec import SubplotSpec
from matplotlib.patches import Circle

from cockpit_cli.recent import RECENT_MIN, RECENT_SHARE, recent_label
from cockpit_cli.report.data import RunView
from cockpit_cli.report.plotting import BASE_FONT_SIZE, PRIMARY, SECONDARY, STEP_LABEL, TERTIARY, empty_panel, finite, log_y, step_limits, style

ALPHA_LIMIT = 1.5  # the Alpha panel shows [-1.5, 1.5]; values beyond are drawn in the edge bins
TESTS = (("NormTest", "norm test", PRIMARY), ("InnerTest", "inner-product test", SECONDARY), ("OrthoTest", "orthogonality test", TERTIARY))


def _gaussian(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Density of the normal distribution fitted to ``values`` on ``grid``."""
    mean, std = float(np.mean(values)), float(np.std(values)) or 1e-3
    return np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def alpha_gauge(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """Alpha over the unit parabola: the distribution of all tracked values and of the recent ones."""
    ax = figure.add_subplot(spec)
    title = "Alpha distribution"
    alpha = view.quantity("Alpha")
    _, values = finite(alpha)
    nonfinite = len(alpha) - len(values)  # steps after a divergence
    if len(values) < 2:
        few = f"{len(values)} finite value of {len(alpha)} tracked steps" if nonfinite else "too few tracked steps"
        empty_panel(ax, title, view.why_empty("Alpha") if not len(alpha) else f"Alpha: {few} for a distribution")
        return
    grid = np.linspace(-ALPHA_LIMIT, ALPHA_LIMIT, 200)
    ax.plot(grid, grid**2, color=SECONDARY, lw=2, label="unit parabola (loss along the step)")
    for x in (-1, 0, 1):
        ax.axvline(x, color="#ababba", lw=1.2, zorder=0)
    ax.set_xlim(-ALPHA_LIMIT, ALPHA_LIMIT)
    ax.set_ylim(0, 1.75)
    outside = int(np.sum(np.abs(values) > ALPHA_LIMIT))
    notes = [f"{nonfinite} of {len(alpha)} non-finite"] if nonfinite else []
    notes += [f"{outside} of {len(values)} beyond ±{ALPHA_LIMIT}, in the edge bins"] if outside else []
    if notes:
        title += f" ({'; '.join(notes)})"
    style(ax, title, "local step length α  (−1: too short, 0: to the minimum, 1: overshoot)", "standardised loss")
    twin = ax.twinx()
    _, last = finite(alpha.last(RECENT_SHARE, RECENT_MIN))
    bins = np.linspace(-ALPHA_LIMIT, ALPHA_LIMIT, 31)
    for subset, label, color, opacity in ((values, "all", "grey", 0.45), (last, recent_label(len(alpha)), PRIMARY, 0.75)):
        if not len(subset):  # a run that went non-finite: its recent values are NaN
            twin.plot([], [], color=color, lw=6, alpha=opacity, label=f"{label}: none finite")
            continue
        clipped = np.clip(subset, -ALPHA_LIMIT, ALPHA_LIMIT)
        twin.hist(clipped, bins, density=True, color=color, alpha=opacity, label=f"{label} (median {np.median(subset):.2f})")
        if len(subset) > 1:
            twin.plot(grid, _gaussian(clipped, grid), color=color, lw=1.2)
    twin.set_ylabel("α density", fontsize=BASE_FONT_SIZE)
    twin.tick_params(labelsize=BASE_FONT_SIZE - 1)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    twin.legend(handles, [h.get_label() for h in handles], fontsize=BASE_FONT_SIZE - 1.5, loc="upper center", framealpha=0.85)


def gradient_tests_gauge(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """The three gradient tests: their latest values as a picture, and their series over time."""
    series = {name: finite(view.quantity(name), positive=True) for name, _, _ in TESTS}
    if not any(len(values) for _, values in series.values()):
        empty_panel(figure.add_subplot(spec), "Gradient tests", view.why_empty("NormTest"))
        return
    grid = spec.subgridspec(3, 2, width_ratios=[1, 1.1], hspace=0.12, wspace=0.4)
    picture = figure.add_subplot(grid[:2, 1])
    latest: dict[str, float] = {}
    axes = [figure.add_subplot(grid[row, 0]) for row in range(3)]
    for row, (ax, (name, label, color)) in enumerate(zip(axes, TESTS)):
        steps, values = series[name]
        style(ax, "Gradient tests over time" if row == 0 else "", STEP_LABEL if row == 2 else None, name.removesuffix("Test").lower())
        step_limits(ax, view.step_span())
        if row < 2:
            ax.tick_params(labelbottom=False)
        if not len(values):
            ax.text(0.5, 0.5, view.why_empty(name), ha="center", va="center", transform=ax.transAxes, fontsize=BASE_FONT_SIZE - 1.5, color="#555555")
            continue
        ax.fill_between(steps, values, color=color, alpha=0.4)
        ax.plot(steps, values, color=color, lw=1)
        ax.axhline(1, color="black", ls="--", lw=0.8)
        log_y(ax)
        latest[name] = float(values[-1])
    limit = max(1.5, 1.15 * max(latest.values(), default=1.0))
    if "InnerTest" in latest:
        picture.axhspan(-latest["InnerTest"], latest["InnerTest"], color=SECONDARY, alpha=0.35, label=f"inner ±{latest['InnerTest']:.3g}")
    if "OrthoTest" in latest:
        picture.axvspan(-latest["OrthoTest"], latest["OrthoTest"], color=TERTIARY, alpha=0.35, label=f"ortho ±{latest['OrthoTest']:.3g}")
    if "NormTest" in latest:
        picture.add_patch(Circle((0, 0), latest["NormTest"], facecolor=(*PRIMARY, 0.35), edgecolor=PRIMARY, lw=1.5, label=f"norm r = {latest['NormTest']:.3g}"))
    picture.add_patch(Circle((0, 0), 1.0, fill=False, ls="--", edgecolor="black", lw=0.9, label="1: above, batch too small"))
    picture.plot(0, 0, marker="+", color="black", markersize=14, markeredgewidth=2.5)
    picture.set_xlim(-limit, limit)
    picture.set_ylim(-limit, limit)
    picture.set_aspect("equal", adjustable="box")
    style(picture, "Gradient tests (latest)", "orthogonal direction", "gradient direction")
    legend = figure.add_subplot(grid[2, 1])
    legend.set_axis_off()
    legend.legend(*picture.get_legend_handles_labels(), fontsize=BASE_FONT_SIZE - 1.5, loc="lower center", ncol=2, frameon=False)


def _latest_histogram(view: RunView, name: str) -> tuple[int, dict, int] | None:
    """The step and value of the last recorded histogram ``name`` in the view that counted
    anything, and how many later ones counted nothing (after a divergence every element is NaN)."""
    raw = view.raw(name)
    for later, (step, value) in enumerate(zip(reversed(raw.steps), reversed(raw.values))):
        if isinstance(value, dict) and any(value.get("counts") or ()):
            return int(step), value, later
    return None


def _histogram_title(title: str, step: int, empty_after: int) -> str:
    """``title (step s)``, saying when later tracked steps counted no element."""
    return f"{title} (step {step}; the {empty_after} tracked later counted nothing: non-finite)" if empty_after else f"{title} (step {step})"


def histogram_1d_gauge(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """The latest histogram of per-sample gradient elements, log y; the clamped edge bins marked."""
    ax = figure.add_subplot(spec)
    found = _latest_histogram(view, "GradHist1d")
    if found is None:
        empty_panel(ax, "Gradient element histogram", view.why_empty("GradHist1d"))
        return
    step, value, empty_after = found
    counts = np.asarray(value["counts"], dtype=float)
    low, high = value.get("range") or (-2.0, 2.0)
    edges = np.linspace(low, high, len(counts) + 1)
    colors = [SECONDARY] * len(counts)
    colors[0] = colors[-1] = "#d62728"
    ax.bar(edges[:-1], np.maximum(counts, 0.8), width=np.diff(edges), align="edge", color=colors, edgecolor="none")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    ax.set_xlim(low, high)
    style(ax, _histogram_title("Gradient element histogram", step, empty_after), "per-sample gradient element value", "count (log scale)")
    total = counts.sum()
    share = f": {100 * (counts[0] + counts[-1]) / total:.3g}% of {total:,.0f}" if total > 0 else ""
    ax.text(0.99, 0.97, f"red: edge bins (clamped values){share}", transform=ax.transAxes, ha="right", va="top", fontsize=BASE_FONT_SIZE - 1.5, color="#d62728")


def histogram_2d_gauge(figure: Figure, spec: SubplotSpec, view: RunView) -> None:
    """The latest joint histogram of (parameter value, gradient element) with both marginals."""
    found = _latest_histogram(view, "GradHist2d")
    if found is None:
        empty_panel(figure.add_subplot(spec), "Gradient / parameter histogram", view.why_empty("GradHist2d"))
        return
    step, value, empty_after = found
    counts = np.asarray(value["counts"], dtype=float)  # (gradient bins, parameter bins)
    (g_low, g_high), (p_low, p_high) = value.get("range") or ((-1.0, 1.0), (-2.0, 2.0))
    grid = spec.subgridspec(2, 2, width_ratios=[4, 1], height_ratios=[1, 3], hspace=0.05, wspace=0.05)
    main = figure.add_subplot(grid[1, 0])
    top = figure.add_subplot(grid[0, 0], sharex=main)
    side = figure.add_subplot(grid[1, 1], sharey=main)
    image = np.where(counts > 0, counts, np.nan)
    main.imshow(image, origin="lower", aspect="auto", extent=(p_low, p_high, g_low, g_high), cmap="magma_r", norm=LogNorm(vmin=1, vmax=max(2.0, counts.max())), interpolation="nearest")
    style(main, "", "parameter value", "gradient element value")
    main.grid(False)
    p_edges = np.linspace(p_low, p_high, counts.shape[1] + 1)
    g_edges = np.linspace(g_low, g_high, counts.shape[0] + 1)
    top.bar(p_edges[:-1], np.maximum(counts.sum(axis=0), 0.8), width=np.diff(p_edges), align="edge", color=SECONDARY)
    side.barh(g_edges[:-1], np.maximum(counts.sum(axis=1), 0.8), height=np.diff(g_edges), align="edge", color=SECONDARY)
    top.set_yscale("log")
    side.set_xscale("log")
    style(top, _histogram_title("Gradient / parameter histogram", step, empty_after), None, "count\n(log)")
    style(side, "", "count (log)", None)
    top.tick_params(labelbottom=False, labelleft=False)
    side.tick_params(labelleft=False, labelbottom=False)
