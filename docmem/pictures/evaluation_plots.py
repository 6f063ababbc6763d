"""
Pictures of the evaluation of a trained memory (evaluate_memory.py): recall bars, the
documents x keys CE matrix, memory size against document length, the DocRep landscape and
the memory-selection statistics over epochs, for one run or several overlaid.

Same conventions as plots.py: every function builds its own Figure on an Agg canvas (no
pyplot state), creates the parent folder, writes the PNG and returns its path.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.patches import Rectangle

from docmem.pictures.plots import new_figure, save_figure

STAT_SERIES = (("l0", "L0 (entries in use)"), ("l2", "L2 norm"),
               ("pairwise_distance", "mean pairwise distance"), ("normalized_distance", "distance / L2"))


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -----------------------------------------------------------------------------
# recall


def plot_recall_bars(means: dict[str, dict[str, dict[str, float]]], path: Path, title: str = "",
                     measure: str = "recall") -> Path:
    """Grouped bars: one group per ROUGE type, one bar per condition (means[condition][rouge][measure])."""
    conditions = list(means)
    if not conditions:
        raise ValueError("no conditions to plot")
    rouges = list(next(iter(means.values())))
    fig = new_figure(2.0 + 1.6 * len(rouges) + 0.35 * len(conditions), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(conditions)
    x = np.arange(len(rouges))
    for c, condition in enumerate(conditions):
        values = [means[condition][r][measure] for r in rouges]
        bars = ax.bar(x + (c - (len(conditions) - 1) / 2) * width, values, width, label=condition)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, rouges)
    ax.set_ylim(0, 1.18)  # headroom: the legend sits above the bars
    ax.set_ylabel(f"ROUGE {measure} (mean over documents)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(conditions))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or f"recall of document content in generation ({measure})", fontsize=10, parse_math=False)
    return save_figure(fig, path)


def plot_compare_recall(labels: list[str], values: dict[str, list[float | None]], path: Path,
                        ylabel: str = "ROUGE-L recall", top: float = 1.18) -> Path:
    """Grouped bars across runs: one group per run, one bar per condition (None = not measured);
    the y axis runs from 0 to `top` (headroom above the bars for the legend)."""
    if not labels:
        raise ValueError("no runs to plot")
    conditions = list(values)
    fig = new_figure(3.0 + 0.9 * len(labels) * max(1, len(conditions)) / 3, 4.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(conditions))
    x = np.arange(len(labels))
    for c, condition in enumerate(conditions):
        ys = [np.nan if v is None else v for v in values[condition]]
        ax.bar(x + (c - (len(conditions) - 1) / 2) * width, ys, width, label=condition)
    ax.set_xticks(x, [_short(label, 36) for label in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, top)  # headroom: the legend sits above the bars
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper center", ncol=max(1, len(conditions)))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{ylabel} by run and condition", fontsize=10)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# CE matrix


def plot_ce_matrix(matrix: np.ndarray, titles: list[str], path: Path) -> Path:
    """Heatmap of the mean CE of each document (rows) under each document's key (columns);
    each row's minimum is outlined (it should sit on the diagonal)."""
    m = np.asarray(matrix, dtype=float)
    n = m.shape[0]
    if m.ndim != 2 or m.shape[1] != n or len(titles) != n:
        raise ValueError(f"need a square matrix with one title per row, got {m.shape} and {len(titles)} titles")
    side = min(max(3.5 + 0.45 * n, 5.0), 16.0)
    fig = new_figure(side + 2.5, side)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis_r", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label("mean CE (nats/token)")
    labels = [f"{i}: {_short(t)}" for i, t in enumerate(titles)]
    ax.set_yticks(np.arange(n), labels, fontsize=8 if n <= 20 else 6, parse_math=False)
    ax.set_xticks(np.arange(n), [str(i) for i in range(n)], fontsize=8 if n <= 20 else 6)
    ax.set_xlabel("key of document")
    ax.set_ylabel("document")
    if n <= 20:  # numbers stay legible
        vmid = (np.nanmin(m) + np.nanmax(m)) / 2
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > vmid else "black")
    for i in range(n):
        j = int(np.nanargmin(m[i]))
        ax.add_patch(_outline(j, i, "red" if j != i else "white"))
    hits = sum(int(np.nanargmin(m[i])) == i for i in range(n))
    ax.set_title(f"documents x keys: mean CE\nrow minimum on the diagonal in {hits} of {n} rows", fontsize=10)
    return save_figure(fig, path)


def _outline(x: int, y: int, colour: str):
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=2)


# -----------------------------------------------------------------------------
# memory size against document length


def plot_length_vs_l0(lengths: list[float], l0: list[float], titles: list[str], path: Path,
                      r: float | None, threshold: float) -> Path:
    fig = new_figure(6.0, 4.5)
    ax = fig.subplots()
    ax.scatter(lengths, l0, color="tab:blue")
    if len(titles) <= 20:
        for x, y, t in zip(lengths, l0, titles):
            ax.annotate(_short(t, 20), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if r is not None and len(lengths) >= 2:
        slope, intercept = np.polyfit(lengths, l0, 1)
        xs = np.linspace(min(lengths), max(lengths), 2)
        ax.plot(xs, slope * xs + intercept, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("document length (tokens trained on)")
    ax.set_ylabel(f"L0 of its selection (|s| > {threshold:g})")
    r_text = "undefined (constant input or < 2 documents)" if r is None else f"{r:.3f}"
    ax.set_title(f"memory size against document length: Pearson R = {r_text}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# DocRep landscape


def _draw_landscape(ax: Axes, ppl: np.ndarray, axis: np.ndarray, own_key: tuple[float, float],
                    other_keys: list[tuple[float, float]], minimum: tuple[float, float], title: str) -> None:
    finite = ppl[np.isfinite(ppl)]
    # perplexity spans orders of magnitude between the own key and far away: log colours
    norm = LogNorm(vmin=max(float(finite.min()), 1e-6), vmax=max(float(finite.max()), float(finite.min()) * 1.0001))
    step = (axis[-1] - axis[0]) / max(1, len(axis) - 1)
    extent = (axis[0] - step / 2, axis[-1] + step / 2, axis[0] - step / 2, axis[-1] + step / 2)
    # rows of ppl are the second key coordinate (y), columns the first (x)
    im = ax.imshow(ppl, origin="lower", extent=extent, cmap="magma_r", norm=norm, interpolation="nearest")
    if other_keys:
        ox, oy = zip(*other_keys)
        ax.scatter(ox, oy, marker="o", s=18, facecolor="none", edgecolor="cyan", label="other documents' keys")
    ax.scatter([own_key[0]], [own_key[1]], marker="*", s=140, color="lime", edgecolor="black", label="own key")
    ax.scatter([minimum[0]], [minimum[1]], marker="x", s=60, color="blue", label="grid minimum")
    ax.set_xlabel("key[0]")
    ax.set_ylabel("key[1]")
    ax.set_title(title, fontsize=9, parse_math=False)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("perplexity")


def plot_landscape(ppl: np.ndarray, axis: np.ndarray, own_key: tuple[float, float],
                   other_keys: list[tuple[float, float]], minimum: tuple[float, float], title: str,
                   path: Path) -> Path:
    """One document's perplexity over a grid of keys: ppl[y_index, x_index]."""
    fig = new_figure(6.0, 5.0)
    ax = fig.subplots()
    _draw_landscape(ax, ppl, axis, own_key, other_keys, minimum, title)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.7)
    return save_figure(fig, path)


def plot_landscape_overview(ppls: list[np.ndarray], axis: np.ndarray, keys: list[tuple[float, float]],
                            minima: list[tuple[float, float]], titles: list[str], path: Path,
                            max_docs: int = 16) -> Path:
    """Every document's landscape side by side (at most max_docs of them)."""
    n = min(len(ppls), max_docs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = new_figure(3.6 * cols, 3.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i in range(n):
        others = [k for j, k in enumerate(keys) if j != i]
        _draw_landscape(axes[i], ppls[i], axis, keys[i], others, minima[i], f"{i}: {_short(titles[i], 24)}")
    for ax in axes[n:]:
        ax.set_axis_off()
    if n < len(ppls):
        fig.suptitle(f"first {n} of {len(ppls)} documents", fontsize=10)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# selection statistics over epochs


def plot_selection_stats(histories: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """L0, L2, pairwise and normalized distance over epochs: one line per run (label -> metrics rows)."""
    fig = new_figure(10.0, 6.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    drawn = False
    for label, history in histories.items():
        rows = [h for h in history if h.get("l0") is not None]
        if not rows:
            continue
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(rows)]
        for ax, (key, _) in zip(axes, STAT_SERIES):
            ys = [np.nan if h.get(key) is None else float(h[key]) for h in rows]
            ax.plot(epochs, ys, label=_short(label, 40), linewidth=1.3,
                    marker="o" if len(rows) <= 30 else None, markersize=2.5)
        drawn = True
    for ax, (_, name) in zip(axes, STAT_SERIES):
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    if drawn:
        axes[0].legend(fontsize=7, loc="best")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no selection statistics recorded\n(a shared memory has no selection)",
                    ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=8)
    fig.suptitle(title or "memory-selection statistics, mean over documents", fontsize=10)
    return save_figure(fig, path)
