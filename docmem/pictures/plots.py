"""
Pictures of a docmem run: loss curves, memory-selection heatmaps, a logit lens of each
document's memory readout, and GIFs of those over training (docs/run_folder.md, summaries/).

Every picture builds its own matplotlib Figure with an Agg canvas (no pyplot, so no global
figure registry to leak into): draw_X returns the figure, unsaved (what a test inspects), and
plot_X writes it (creating the parent directory) and returns its path. Figures have fixed sizes for fixed inputs (no bbox_inches="tight"), so the frames
saved at successive epochs have the same pixel size and stack into a GIF cleanly. The three
pictures of a summary (LossCurves, SelectionHeatmap, LogitLensTable) are classes whose figure a
caller may keep from one frame to the next (summaries.SummaryWriter does): a frame then costs
its changing artists only, and comes out pixel for pixel as a new figure would.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colormaps, font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from docmem.atomic import disk_full_as_error, temporary_name

DPI = 100
TOKEN_FONT = "DejaVu Sans Mono"  # ships with matplotlib; monospace lines tokens up
LOSS_SERIES = ("loss", "ce_positive", "ce_negative")
GIF_BACKGROUND = (255, 255, 255)
PNG_COMPRESS_LEVEL = 3  # zlib: below the default 6, trading slightly larger files for faster writing

# -----------------------------------------------------------------------------
# small helpers


def new_figure(width: float, height: float) -> Figure:
    """A figure attached to an Agg canvas; constrained layout keeps labels from overlapping."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path, keep: bool = False) -> Path:
    """Lay out and render `fig` once, and write it as an RGB PNG (the figure is opaque: an alpha
    channel would only cost bytes, encoding and decoding). Unless `keep`, the figure is cleared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # savefig would draw twice (once without rendering, to lay out); Agg's draw lays out as it draws
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    info = PngInfo()
    info.add_text("Software", f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/")
    tmp = temporary_name(path)  # a killed process leaves no half picture under the real name
    try:
        with disk_full_as_error(path):
            image.save(tmp, format="PNG", dpi=(DPI, DPI), pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if not keep:
        fig.clear()  # drop the artists now rather than at garbage collection
    return path


class _FreshLayout:
    """Where a new figure's axes stand before its first draw. Constrained layout starts from the
    axes' current positions and stops after two passes, so a kept figure laid out again from last
    frame's positions lands a fraction of a pixel elsewhere (and a line added in axes coordinates
    takes its data limits through the axes' position); put back here at the start of each frame,
    it lays out exactly as a fresh figure does."""

    def __init__(self, fig: Figure) -> None:
        self.axes = [(ax, ax.get_position(original=True), ax.get_position(), ax.get_in_layout()) for ax in fig.axes]

    def restore(self) -> None:
        for ax, original, active, in_layout in self.axes:
            ax.set_position(original, which="original")
            ax.set_position(active, which="active")
            ax.set_in_layout(in_layout)  # set_position takes the axes out of the layout


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


def _loss_panels(history: list[dict[str, float]], target: float | None, title: str) -> tuple:
    """What fixes a loss figure's artists: the series drawn, whether a guidance term is, the target
    line, whether there is a title."""
    keys = tuple(key for key in LOSS_SERIES if np.isfinite(_series(history, key)).any())
    return keys, bool(np.isfinite(_series(history, "guidance_term")).any()), target, bool(title)


class LossCurves:
    """Loss, positive and negative CE over epochs, and the guidance term on a second panel, kept
    from one summary to the next: a later frame replaces the lines' data, their legends, the y
    scale and the title (the figure, its axes and ticks are built once). Draws the same picture
    as a fresh figure would; a history with other series needs a new LossCurves (`fits`).

    Series absent from every epoch (e.g. ce_negative when guidance is 0) are skipped;
    `target` (tau, --target_negative_ce) is drawn as a dashed horizontal line.
    """

    def __init__(self, history: list[dict[str, float]], target: float | None = None, title: str = "") -> None:
        self.panels = _loss_panels(history, target, title)
        keys, guidance, _, titled = self.panels
        self.fig = new_figure(8.0, 6.0)
        self.ax_ce, self.ax_g = ax_ce, ax_g = self.fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
        self.lines: dict[str, Line2D] = {}
        for key in keys:
            # loss ~ ce_positive when guidance is small: draw it wide and pale underneath
            style = dict(color="black", linewidth=3.5, alpha=0.3) if key == "loss" else dict(linewidth=1.5)
            self.lines[key] = ax_ce.plot([], [], markersize=3, **style)[0]
        self.target_line: Line2D | None = None  # added at each frame, after the lines, as a fresh figure does
        if not keys:
            ax_ce.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax_ce.transAxes)
        ax_ce.set_ylabel("cross-entropy (nats/token)")
        ax_ce.grid(True, alpha=0.3, which="both")
        if guidance:
            self.lines["guidance_term"] = ax_g.plot([], [], markersize=3, color="tab:purple")[0]
        else:
            ax_g.text(0.5, 0.5, "no guidance term recorded", ha="center", va="center",
                      transform=ax_g.transAxes, color="grey")
            ax_g.set_yticks([])
        ax_g.set_ylabel("guidance term")
        ax_g.set_xlabel("epoch")
        ax_g.grid(True, alpha=0.3)
        self.title = self.fig.suptitle("", parse_math=False) if titled else None
        self.fresh = _FreshLayout(self.fig)

    def fits(self, history: list[dict[str, float]], target: float | None = None, title: str = "") -> bool:
        return _loss_panels(history, target, title) == self.panels

    def draw(self, history: list[dict[str, float]], path: Path, title: str = "") -> Path:
        return save_figure(self.frame(history, title), path, keep=True)

    def frame(self, history: list[dict[str, float]], title: str = "") -> Figure:
        """The figure with this history's lines, legends, y scale and title (not yet rendered)."""
        keys, _, target, _ = self.panels
        if not self.fits(history, target, title):
            raise ValueError("this history has other series than the figure was built for")
        self.fresh.restore()
        epochs = _series(history, "epoch")
        if np.isnan(epochs).any():  # fall back to positions if some epoch numbers are missing
            epochs = np.arange(len(history), dtype=float)
        marker = "o" if len(history) <= 30 else "None"  # a handful of points are otherwise invisible
        if self.ax_ce.get_yscale() != "linear":  # as a fresh figure's axes are while their lines are added
            self.ax_ce.set_yscale("linear")
        for key, line in self.lines.items():
            y = _series(history, key)
            line.set(data=(epochs, y), marker=marker, label=f"{key} (last {y[np.isfinite(y)][-1]:.4g})")
        if self.target_line is not None:
            self.target_line.remove()
        for ax in {line.axes for line in self.lines.values()}:  # an axes without lines keeps its default limits
            ax.relim()
            ax.autoscale()
        if target is not None:
            # its data limits go through the view limits of the moment (rounding in the last bit): add it
            # where a fresh figure does, so the limits and the pixels come out the same
            self.target_line = self.ax_ce.axhline(target, color="grey", linestyle="--", linewidth=1,
                                                  label=f"target_negative_ce = {target:g}")
        if keys:
            vals = np.concatenate([_series(history, key) for key in keys] + [np.array([target])] * (target is not None))
            vals = vals[np.isfinite(vals)]
            # memorisation drives CE over orders of magnitude; a log axis keeps the tail readable
            if vals.min() > 0 and vals.max() / vals.min() > 20:
                self.ax_ce.set_yscale("log")
            self.ax_ce.legend(loc="best", fontsize=8)
        if "guidance_term" in self.lines:
            self.ax_g.legend(loc="best", fontsize=8)
        if self.title is not None:
            self.title.set_text(title)
        return self.fig


def draw_losses(history: list[dict[str, float]], title: str = "", target: float | None = None) -> Figure:
    """The figure of the loss curves of `history`; see LossCurves, which draws them (and keeps the
    figure for the next frame of a GIF)."""
    return LossCurves(history, target=target, title=title).frame(history, title=title)


def plot_losses(history: list[dict[str, float]], path: Path, title: str = "",
                target: float | None = None) -> Path:
    """draw_losses, written to `path`."""
    return save_figure(draw_losses(history, title, target), path)


# -----------------------------------------------------------------------------
# memory-selection heatmap


def _check_selections(selections: np.ndarray, titles: list[str]) -> np.ndarray:
    sel = np.asarray(selections, dtype=float)
    if sel.ndim != 2:
        raise ValueError(f"selections must be (n_docs, m), got shape {sel.shape}")
    if len(titles) != sel.shape[0]:
        raise ValueError(f"{len(titles)} titles for {sel.shape[0]} documents")
    if sel.size == 0:
        raise ValueError("selections is empty")
    return sel


class SelectionHeatmap:
    """The selection heatmap of one set of documents, kept from one summary to the next: a later
    frame only replaces the cell colours, the colour scale and the title (the figure, its ticks,
    labels and colour bar are built once). Draws the same picture as a fresh figure would.

    The colour scale is symmetric about 0 (diverging), so signed tanh selections, sparse relu
    ones and flat sigmoid ones are all read against the same neutral white. It spans
    [-vmax, vmax]; with vmax None, vmax = max |s| of each frame. A fixed vmax (e.g. 1 for tanh
    or sigmoid) keeps colours comparable across the frames of a GIF.
    """

    def __init__(self, titles: list[str], m: int, vmax: float | None = None, max_docs: int = 64) -> None:
        self.titles, self.m, self.vmax = list(titles), m, vmax
        self.rows = _even_sample(len(titles), max_docs)
        charmap = _font_charmap()
        labels = [f"{i}: {_label(titles[i], charmap, 30)}" for i in self.rows]
        # cell sizes in inches, clamped so 2 entries or 2048 entries both give a sane figure
        row_h = min(max(6.0 / len(self.rows), 0.17), 0.35)  # few documents get taller rows
        cells_h = max(len(self.rows) * row_h, 2.0)
        width = 3.2 + 1.0 + min(max(m * 0.25, 2.5), 14.0)  # labels + colorbar + cells
        self.fig = new_figure(width, 1.4 + cells_h)
        self.ax = ax = self.fig.subplots()
        self.norm = Normalize(-1.0, 1.0)
        self.image = ax.imshow(np.zeros((len(self.rows), m)), cmap="RdBu_r", norm=self.norm, aspect="auto",
                               interpolation="nearest")
        # the default aspect (20) would make the colorbar much shorter than a tall heatmap
        cbar = self.fig.colorbar(self.image, ax=ax, fraction=0.05, pad=0.02, aspect=max(20.0, cells_h / 0.2))
        cbar.set_label("selection s_i")
        ytick_size = 7 if len(self.rows) > 40 else 8
        ax.set_yticks(np.arange(len(self.rows)), labels, fontsize=ytick_size, parse_math=False)
        if m <= 64:
            ax.set_xticks(np.arange(m), [str(j) for j in range(m)], fontsize=6 if m > 32 else 7)
        ax.set_xlabel("memory entry")
        ax.set_ylabel("document")
        self.fresh = _FreshLayout(self.fig)

    def fits(self, selections: np.ndarray, titles: list[str]) -> bool:
        """Whether this figure can draw `selections` of `titles` (same documents, same entries)."""
        return list(titles) == self.titles and np.shape(selections)[1:] == (self.m,)

    def draw(self, selections: np.ndarray, path: Path, epoch: int | None = None) -> Path:
        return save_figure(self.frame(selections, epoch), path, keep=True)

    def frame(self, selections: np.ndarray, epoch: int | None = None) -> Figure:
        """The figure with these selections' colours, colour scale and title (not yet rendered)."""
        sel = _check_selections(selections, self.titles)
        if not self.fits(sel, self.titles):
            raise ValueError(f"selections of shape {sel.shape} for a heatmap of {len(self.titles)} x {self.m}")
        self.fresh.restore()
        n_docs, m = sel.shape
        shown = sel[self.rows]
        finite = shown[np.isfinite(shown)]
        vmax = self.vmax
        if vmax is None:
            vmax = float(np.abs(finite).max()) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        with self.norm.callbacks.blocked():  # one update of the image and the colour bar, not two
            self.norm.vmin, self.norm.vmax = -vmax, vmax
        self.norm.callbacks.process("changed")
        self.image.set_data(shown)
        title = f"memory selection s_i{_epoch_suffix(epoch)}"
        stats = f"range [{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "no finite values"
        sub = f"{n_docs} document{'s' if n_docs != 1 else ''} × {m} entries, {stats}"
        if len(self.rows) < n_docs:
            sub = f"showing {len(self.rows)} of {n_docs} documents (evenly sampled), {m} entries, {stats}"
        self.ax.set_title(f"{title}\n{sub}", fontsize=10)
        return self.fig


def draw_selection_heatmap(selections: np.ndarray, titles: list[str], epoch: int | None = None,
                           max_docs: int = 64, vmax: float | None = None) -> Figure:
    """The figure of each document's memory selection s_i (rows: documents, columns: entries); see
    SelectionHeatmap, which draws it (and keeps the figure for the next frame of a GIF)."""
    sel = _check_selections(selections, titles)
    return SelectionHeatmap(titles, sel.shape[1], vmax=vmax, max_docs=max_docs).frame(sel, epoch=epoch)


def plot_selection_heatmap(selections: np.ndarray, titles: list[str], path: Path,
                           epoch: int | None = None, max_docs: int = 64,
                           vmax: float | None = None) -> Path:
    """draw_selection_heatmap, written to `path`."""
    return save_figure(draw_selection_heatmap(selections, titles, epoch, max_docs, vmax), path)


# -----------------------------------------------------------------------------
# logit lens


def _header(index: int, title: str, charmap: set[int]) -> str:
    """A column header: the title on up to two lines of a column's width, then the index."""
    lines = textwrap.wrap(_label(title, charmap, 200), 22) or [""]
    if len(lines) > 2:
        lines = [lines[0], _truncate(" ".join(lines[1:]), 22)]
    return "\n".join(lines + [f"#{index}"])


def _lens_depth(top_tokens: list[list[tuple[str, float]]], docs: np.ndarray) -> int:
    """k: the table's number of rank rows, the longest shown list."""
    return max(1, max(len(top_tokens[i]) for i in docs))


def _check_lens(top_tokens: list[list[tuple[str, float]]], titles: list[str]) -> None:
    if len(titles) != len(top_tokens):
        raise ValueError(f"{len(titles)} titles for {len(top_tokens)} documents")
    if not top_tokens:
        raise ValueError("top_tokens is empty")


class LogitLensTable:
    """The logit-lens table of one set of documents (one column per document, tokens in rank
    order on a background coloured by score), kept from one summary to the next: a later frame
    only replaces the cell colours and texts, the colour scale and the title. Its ~400 cell texts,
    ticks, headers and colour bar are built once, and the cell texts stay out of the layout
    (they lie inside their cells). Draws the same picture as a fresh figure would.

    The score colours share one scale over all shown documents; more than 8 documents wrap onto
    further rows of columns so the image stays roughly square.
    """

    def __init__(self, titles: list[str], k: int, max_docs: int = 16) -> None:
        self.titles, self.k = list(titles), k
        self.docs = _even_sample(len(titles), max_docs)
        self.token_charmap = _font_charmap(TOKEN_FONT)
        charmap = _font_charmap()
        # at most 8 columns per row of the table, rows balanced (10 docs: 5 + 5, not 8 + 2)
        n_blocks = math.ceil(len(self.docs) / 8)
        self.per_row = per_row = math.ceil(len(self.docs) / n_blocks)
        self.norm, self.cmap = Normalize(0.0, 1.0), colormaps["YlGnBu"]
        self.fig = new_figure(1.2 + 1.55 * per_row + 1.0, 1.0 + n_blocks * (0.9 + 0.21 * k))
        axes = self.fig.subplots(n_blocks, 1, squeeze=False)[:, 0]
        self.images, self.cells = [], []  # per block: its image, and (token, score) texts by [column][rank]
        for b, ax in enumerate(axes):
            headers = [_header(i, titles[i], charmap) for i in self.docs[b * per_row:(b + 1) * per_row]]
            self.images.append(ax.imshow(np.ma.masked_all((k, per_row)), cmap=self.cmap, norm=self.norm,
                                         aspect="auto", interpolation="nearest"))
            # parse_math=False: a "$" in a token must not start mathtext
            self.cells.append([[(ax.text(c - 0.45, r, "", ha="left", va="center", fontsize=7.5, parse_math=False,
                                         family=TOKEN_FONT, in_layout=False),
                                 ax.text(c + 0.45, r, "", ha="right", va="center", fontsize=6.5, in_layout=False))
                                for r in range(k)] for c in range(per_row)])
            ax.set_xticks(np.arange(per_row), headers + [""] * (per_row - len(headers)), fontsize=7.5,
                          parse_math=False)
            ax.xaxis.tick_top()
            ax.set_yticks(np.arange(k), [str(r + 1) for r in range(k)], fontsize=7)
            ax.set_ylabel("rank")
            ax.tick_params(length=0)
            # thin white grid lines between cells make the table readable
            ax.set_xticks(np.arange(per_row + 1) - 0.5, minor=True)
            ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
            ax.grid(which="minor", color="white", linewidth=1.5)
            ax.tick_params(which="minor", length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_xlim(-0.5, per_row - 0.5)
            ax.set_ylim(k - 0.5, -0.5)
        cbar = self.fig.colorbar(self.images[0], ax=list(axes), fraction=0.03, pad=0.01, aspect=40)
        cbar.set_label("score")
        self.title = self.fig.suptitle("", fontsize=11)
        self.fresh = _FreshLayout(self.fig)

    @classmethod
    def for_tokens(cls, top_tokens: list[list[tuple[str, float]]], titles: list[str],
                   max_docs: int = 16) -> "LogitLensTable":
        """The table that draws `top_tokens` of `titles`."""
        _check_lens(top_tokens, titles)
        return cls(titles, _lens_depth(top_tokens, _even_sample(len(titles), max_docs)), max_docs)

    def fits(self, top_tokens: list[list[tuple[str, float]]], titles: list[str]) -> bool:
        """Whether this table can draw `top_tokens` of `titles` (same documents, same depth k)."""
        return list(titles) == self.titles and len(top_tokens) == len(titles) and \
            _lens_depth(top_tokens, self.docs) == self.k

    def draw(self, top_tokens: list[list[tuple[str, float]]], path: Path, epoch: int | None = None) -> Path:
        return save_figure(self.frame(top_tokens, epoch), path, keep=True)

    def frame(self, top_tokens: list[list[tuple[str, float]]], epoch: int | None = None) -> Figure:
        """The figure with these tokens' cells, colour scale and title (not yet rendered)."""
        _check_lens(top_tokens, self.titles)
        if not self.fits(top_tokens, self.titles):
            raise ValueError(f"top tokens of {len(top_tokens)} documents for a table of {len(self.titles)} "
                             f"documents, {self.k} ranks")
        self.fresh.restore()
        scores = np.array([float(s) for i in self.docs for _, s in top_tokens[i]], dtype=float)
        scores = scores[np.isfinite(scores)]
        lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        with self.norm.callbacks.blocked():  # one update of the images and the colour bar, not two
            self.norm.vmin, self.norm.vmax = lo, hi
        self.norm.callbacks.process("changed")
        for b, (image, cells) in enumerate(zip(self.images, self.cells)):
            idx = self.docs[b * self.per_row:(b + 1) * self.per_row]
            grid = np.full((self.k, self.per_row), np.nan)
            for c, cell_column in enumerate(cells):
                toks = top_tokens[idx[c]][:self.k] if c < len(idx) else []
                for r, (token_text, score_text) in enumerate(cell_column):
                    if r >= len(toks):
                        token_text.set_text("")
                        score_text.set_text("")
                        continue
                    tok, score = toks[r]
                    grid[r, c] = float(score)
                    colour = _text_colour(self.cmap, self.norm, float(score))
                    token_text.set(text=_visible_token(str(tok), self.token_charmap), color=colour)
                    score_text.set(text=f"{float(score):.3g}", color=colour)
            image.set_data(np.ma.masked_invalid(grid))
        title = f"logit lens: top-{self.k} tokens of each document's memory readout{_epoch_suffix(epoch)}"
        if len(self.docs) < len(self.titles):
            title += f"\nshowing {len(self.docs)} of {len(self.titles)} documents (evenly sampled)"
        self.title.set_text(title)
        return self.fig


def draw_logit_lens(top_tokens: list[list[tuple[str, float]]], titles: list[str], epoch: int | None = None,
                    max_docs: int = 16) -> Figure:
    """The figure of each document's top-k readout tokens; see LogitLensTable, which draws it (and
    keeps the figure for the next frame of a GIF)."""
    return LogitLensTable.for_tokens(top_tokens, titles, max_docs).frame(top_tokens, epoch=epoch)


def plot_logit_lens(top_tokens: list[list[tuple[str, float]]], titles: list[str], path: Path,
                    epoch: int | None = None, max_docs: int = 16) -> Path:
    """draw_logit_lens, written to `path`."""
    return save_figure(draw_logit_lens(top_tokens, titles, epoch, max_docs), path)


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
    """A looping GIF of PNG frames, all brought to the first frame's pixel size, each frame
    reduced to its own 256 colours by Pillow's fast octree quantizer.

    The octree is much faster than the median cut Pillow applies to RGB frames by default, and the
    frames stay the same picture to the eye (tests/test_plots.py bounds each pixel's error; the octree
    may turn white into 254). The GIFs come out smaller, too.

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
            images.append(_fit_to(im, size).quantize(256, method=Image.Quantize.FASTOCTREE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration_ms, loop=0, disposal=1)
    return path
