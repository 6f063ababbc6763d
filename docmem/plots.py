"""
Pictures of a docmem run: loss curves, memory-selection heatmaps, a logit lens of each
document's memory readout, and GIFs of those over training (docs/run_folder.md, summaries/).

Every function builds its own matplotlib Figure with an Agg canvas (no pyplot, so no global
figure registry to leak into), creates the parent directory, writes the file and returns
its path. Figures have fixed sizes for fixed inputs (no bbox_inches="tight"), so the frames
saved at successive epochs have the same pixel size and stack into a GIF cleanly.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
TOKEN_FONT = "DejaVu Sans Mono"  # ships with matplotlib; monospace lines tokens up
LOSS_SERIES = ("loss", "ce_positive", "ce_negative")
GIF_BACKGROUND = (255, 255, 255)

# -----------------------------------------------------------------------------
# small helpers


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas; constrained layout keeps labels from overlapping."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    fig.clear()  # drop the artists now rather than at garbage collection
    return path


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _epoch_suffix(epoch: int | None) -> str:
    return "" if epoch is None else f" (epoch {epoch})"


def _even_sample(n: int, k: int) -> np.ndarray:
    """Indices of k rows spread evenly over n, always including the first and the last."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _font_charmap(family: str | None = None) -> set[int]:
    """Code points a font can draw (default: the default font); others would show as boxes."""
    font_path = font_manager.findfont(font_manager.FontProperties(family=family))
    return set(font_manager.get_font(font_path).get_charmap())


def _visible_token(token: str, charmap: set[int], max_len: int = 14) -> str:
    """Make a vocabulary token's whitespace and undrawable characters visible."""
    if token == "":
        return "∅"
    core = token.lstrip(" ")
    n_lead = len(token) - len(core)
    stripped = core.rstrip(" ")
    n_trail = len(core) - len(stripped)
    out = ["␣" * n_lead]
    for ch in stripped:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable() and ch != " ":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        elif ord(ch) not in charmap:
            # e.g. CJK with DejaVu Sans: show the code point instead of a blank box
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append("␣" * n_trail)
    return _truncate("".join(out), max_len)


def _label(text: str, charmap: set[int], max_len: int) -> str:
    """A document title made safe for a label: one line, drawable characters, bounded length."""
    text = " ".join(str(text).split())
    text = "".join(ch if ord(ch) in charmap else "?" for ch in text)
    return _truncate(text, max_len)


def _text_colour(cmap: Colormap, norm: Normalize, value: float) -> str:
    """Black text on light cells, white on dark ones."""
    r, g, b, _ = cmap(norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# -----------------------------------------------------------------------------
# loss curves


def _series(history: list[dict[str, float]], key: str) -> np.ndarray:
    """One history column as floats, NaN where the epoch lacks it (so lines break there)."""
    vals = [h.get(key) for h in history]
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=float)


def plot_losses(history: list[dict[str, float]], path: Path, title: str = "",
                target: float | None = None) -> Path:
    """Loss, positive and negative CE over epochs, and the guidance term on a second panel.

    Series absent from every epoch (e.g. ce_negative when guidance is 0) are skipped;
    `target` (tau, --target_negative_ce) is drawn as a dashed horizontal line.
    """
    fig = new_figure(8.0, 6.0)
    ax_ce, ax_g = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    epochs = _series(history, "epoch")
    if np.isnan(epochs).any():  # fall back to positions if some epoch numbers are missing
        epochs = np.arange(len(history), dtype=float)
    marker = "o" if len(history) <= 30 else None  # a handful of points are otherwise invisible

    plotted: list[np.ndarray] = []
    for key in LOSS_SERIES:
        y = _series(history, key)
        if np.isfinite(y).any():
            last = y[np.isfinite(y)][-1]
            # loss ~ ce_positive when guidance is small: draw it wide and pale underneath
            style = dict(color="black", linewidth=3.5, alpha=0.3) if key == "loss" else dict(linewidth=1.5)
            ax_ce.plot(epochs, y, marker=marker, markersize=3, label=f"{key} (last {last:.4g})", **style)
            plotted.append(y[np.isfinite(y)])
    if target is not None:
        ax_ce.axhline(target, color="grey", linestyle="--", linewidth=1,
                      label=f"target_negative_ce = {target:g}")
    if plotted:
        vals = np.concatenate(plotted + ([np.array([target])] if target is not None else []))
        # memorisation drives CE over orders of magnitude; a log axis keeps the tail readable
        if vals.min() > 0 and vals.max() / vals.min() > 20:
            ax_ce.set_yscale("log")
        ax_ce.legend(loc="best", fontsize=8)
    else:
        ax_ce.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax_ce.transAxes)
    ax_ce.set_ylabel("cross-entropy (nats/token)")
    ax_ce.grid(True, alpha=0.3, which="both")

    g = _series(history, "guidance_term")
    if np.isfinite(g).any():
        ax_g.plot(epochs, g, marker=marker, markersize=3, color="tab:purple",
                  label=f"guidance_term (last {g[np.isfinite(g)][-1]:.4g})")
        ax_g.legend(loc="best", fontsize=8)
    else:
        ax_g.text(0.5, 0.5, "no guidance term recorded", ha="center", va="center",
                  transform=ax_g.transAxes, color="grey")
        ax_g.set_yticks([])
    ax_g.set_ylabel("guidance term")
    ax_g.set_xlabel("epoch")
    ax_g.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, parse_math=False)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# memory-selection heatmap


def plot_selection_heatmap(selections: np.ndarray, titles: list[str], path: Path,
                           epoch: int | None = None, max_docs: int = 64,
                           vmax: float | None = None) -> Path:
    """Heatmap of each document's memory selection s_i (rows: documents, columns: entries).

    The colour scale is symmetric about 0 (diverging), so signed tanh selections, sparse
    relu ones and flat sigmoid ones are all read against the same neutral white. It spans
    [-vmax, vmax]; by default vmax = max |s|. Pass a fixed vmax (e.g. 1 for tanh or sigmoid)
    to keep colours comparable across the frames of a GIF.
    """
    sel = np.asarray(selections, dtype=float)
    if sel.ndim != 2:
        raise ValueError(f"selections must be (n_docs, m), got shape {sel.shape}")
    n_docs, m = sel.shape
    if len(titles) != n_docs:
        raise ValueError(f"{len(titles)} titles for {n_docs} documents")
    if n_docs == 0 or m == 0:
        raise ValueError("selections is empty")
    rows = _even_sample(n_docs, max_docs)
    shown = sel[rows]
    charmap = _font_charmap()
    labels = [f"{i}: {_label(titles[i], charmap, 30)}" for i in rows]

    # cell sizes in inches, clamped so 2 entries or 2048 entries both give a sane figure
    row_h = min(max(6.0 / len(rows), 0.17), 0.35)  # few documents get taller rows
    cells_h = max(len(rows) * row_h, 2.0)
    width = 3.2 + 1.0 + min(max(m * 0.25, 2.5), 14.0)  # labels + colorbar + cells
    fig = new_figure(width, 1.4 + cells_h)
    ax = fig.subplots()
    finite = shown[np.isfinite(shown)]
    if vmax is None:
        vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    # the default aspect (20) would make the colorbar much shorter than a tall heatmap
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, aspect=max(20.0, cells_h / 0.2))
    cbar.set_label("selection s_i")

    ytick_size = 7 if len(rows) > 40 else 8
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=ytick_size, parse_math=False)
    if m <= 64:
        ax.set_xticks(np.arange(m), [str(j) for j in range(m)], fontsize=6 if m > 32 else 7)
    ax.set_xlabel("memory entry")
    ax.set_ylabel("document")

    title = f"memory selection s_i{_epoch_suffix(epoch)}"
    stats = f"range [{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "no finite values"
    sub = f"{n_docs} document{'s' if n_docs != 1 else ''} × {m} entries, {stats}"
    if len(rows) < n_docs:
        sub = f"showing {len(rows)} of {n_docs} documents (evenly sampled), {m} entries, {stats}"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# logit lens


def _draw_lens_block(ax: Axes, top_tokens: list[list[tuple[str, float]]], headers: list[str],
                     shape: tuple[int, int], colours: ScalarMappable, charmap: set[int]) -> None:
    """One row of document columns: tokens in rank order on a background coloured by score.
    shape: (k ranks, columns); colours: the score's colour map and scale, shared by all blocks."""
    (k, n_cols), cmap, norm = shape, colours.cmap, colours.norm
    grid = np.full((k, n_cols), np.nan)
    for c, toks in enumerate(top_tokens):
        for r, (_, score) in enumerate(toks[:k]):
            grid[r, c] = float(score)
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for c, toks in enumerate(top_tokens):
        for r, (tok, score) in enumerate(toks[:k]):
            colour = _text_colour(cmap, norm, float(score))
            # parse_math=False: a "$" in a token must not start mathtext
            ax.text(c - 0.45, r, _visible_token(str(tok), charmap), ha="left", va="center",
                    fontsize=7.5, color=colour, parse_math=False, family=TOKEN_FONT)
            ax.text(c + 0.45, r, f"{float(score):.3g}", ha="right", va="center",
                    fontsize=6.5, color=colour)
    ax.set_xticks(np.arange(n_cols), headers + [""] * (n_cols - len(headers)), fontsize=7.5,
                  parse_math=False)
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(k), [str(r + 1) for r in range(k)], fontsize=7)
    ax.set_ylabel("rank")
    ax.tick_params(length=0)
    # thin white grid lines between cells make the table readable
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(k - 0.5, -0.5)


def _header(index: int, title: str, charmap: set[int]) -> str:
    """A column header: the title on up to two lines of a column's width, then the index."""
    lines = textwrap.wrap(_label(title, charmap, 200), 22) or [""]
    if len(lines) > 2:
        lines = [lines[0], _truncate(" ".join(lines[1:]), 22)]
    return "\n".join(lines + [f"#{index}"])


def plot_logit_lens(top_tokens: list[list[tuple[str, float]]], titles: list[str], path: Path,
                    epoch: int | None = None, max_docs: int = 16) -> Path:
    """Table of each document's top-k readout tokens (one column per document, rank order).

    Background colour encodes the score on one scale shared by all documents; more than
    8 documents wrap onto further rows of columns so the image stays roughly square.
    """
    if len(titles) != len(top_tokens):
        raise ValueError(f"{len(titles)} titles for {len(top_tokens)} documents")
    if not top_tokens:
        raise ValueError("top_tokens is empty")
    n_docs = len(top_tokens)
    docs = _even_sample(n_docs, max_docs)
    k = max(1, max(len(top_tokens[i]) for i in docs))
    charmap = _font_charmap()
    token_charmap = _font_charmap(TOKEN_FONT)

    # at most 8 columns per row of the table, rows balanced (10 docs: 5 + 5, not 8 + 2)
    n_blocks = math.ceil(len(docs) / 8)
    per_row = math.ceil(len(docs) / n_blocks)
    scores = np.array([float(s) for i in docs for _, s in top_tokens[i]], dtype=float)
    scores = scores[np.isfinite(scores)]
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    colours = ScalarMappable(Normalize(lo, hi), colormaps["YlGnBu"])

    fig = new_figure(1.2 + 1.55 * per_row + 1.0, 1.0 + n_blocks * (0.9 + 0.21 * k))
    axes = fig.subplots(n_blocks, 1, squeeze=False)[:, 0]
    for b, ax in enumerate(axes):
        idx = docs[b * per_row:(b + 1) * per_row]
        headers = [_header(i, titles[i], charmap) for i in idx]
        _draw_lens_block(ax, [top_tokens[i] for i in idx], headers, (k, per_row), colours, token_charmap)
    mappable = axes[0].images[0]
    cbar = fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01, aspect=40)
    cbar.set_label("score")

    title = f"logit lens: top-{k} tokens of each document's memory readout{_epoch_suffix(epoch)}"
    if len(docs) < n_docs:
        title += f"\nshowing {len(docs)} of {n_docs} documents (evenly sampled)"
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# GIFs


def _fit_to(frame: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shrink a frame to fit `size` if it is larger, then pad it onto a white canvas."""
    if frame.mode in ("RGBA", "LA", "P"):
        # composite onto white: dropping alpha would turn transparent pixels black
        rgba = frame.convert("RGBA")
        frame = Image.new("RGB", rgba.size, GIF_BACKGROUND)
        frame.paste(rgba, mask=rgba.getchannel("A"))
    frame = frame.convert("RGB")
    if frame.size == size:
        return frame
    w, h = frame.size
    scale = min(size[0] / w, size[1] / h, 1.0)
    if scale < 1.0:
        frame = frame.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", size, GIF_BACKGROUND)
    canvas.paste(frame, ((size[0] - frame.width) // 2, (size[1] - frame.height) // 2))
    return canvas


def make_gif(frames: list[Path], path: Path, duration_ms: int = 300) -> Path:
    """A looping GIF of PNG frames, all brought to the first frame's pixel size.

    Pillow merges consecutive identical frames into one longer frame, so a GIF of
    unchanged pictures has fewer frames than paths (the total duration is kept).
    """
    if not frames:
        raise ValueError("make_gif needs at least one frame")
    if duration_ms <= 0:
        raise ValueError(f"duration_ms must be positive, got {duration_ms}")
    images: list[Image.Image] = []
    size: tuple[int, int] | None = None
    for p in frames:
        with Image.open(p) as im:
            im.load()
            size = size or im.size
            images.append(_fit_to(im, size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration_ms, loop=0, disposal=1)
    return path
