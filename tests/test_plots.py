"""Tests of plots.py: what each picture draws (its series, data, labels, scales and titles, read from
the figure before it is saved), that it is written and opens with PIL, and that it survives awkward input."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from docmem.pictures import plots

AWKWARD_TOKENS = [" the", "\n", "\n\n", "$", " $", "$x^2$", "  ", "", "é", "中文", "€", "\t", "\r\n",
                  "\\", "\x00", "<|endoftext|>", " Ω", "a_b^c", "averyveryverylongtokenindeed", "{}%#"]


def _open(path: Path) -> tuple[str, tuple[int, int], int]:
    with Image.open(path) as im:
        return im.format, im.size, getattr(im, "n_frames", 1)


def _history(n: int, with_negative: bool = True) -> list[dict[str, float]]:
    hist = []
    for e in range(n):
        h = {"epoch": float(e * 10), "loss": 8.0 * np.exp(-e / 5) + 0.05, "ce_positive": 8.0 * np.exp(-e / 5)}
        if with_negative:
            h["ce_negative"] = 4.5 + np.exp(-e / 3)
            h["guidance_term"] = 0.1 * np.exp(-e / 3)
        hist.append(h)
    return hist


def _lens(n_docs: int, k: int = 20, seed: int = 0) -> list[list[tuple[str, float]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        toks = [AWKWARD_TOKENS[j] for j in rng.permutation(len(AWKWARD_TOKENS))][:k]
        scores = np.sort(rng.uniform(0, 30, len(toks)))[::-1]
        out.append(list(zip(toks, scores.tolist())))
    return out


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_losses(tmp_path: Path) -> None:
    hist = _history(50)
    fig = plots.draw_losses(hist, title="run $1$", target=4.5)
    ce, guidance = fig.axes
    lines = {line.get_label().split(" ")[0]: line for line in ce.get_lines()}
    assert list(lines) == ["loss", "ce_positive", "ce_negative", "target_negative_ce"]
    epochs = [h["epoch"] for h in hist]
    for key in ("loss", "ce_positive", "ce_negative"):
        assert np.array_equal(lines[key].get_xdata(), epochs)
        assert np.allclose(lines[key].get_ydata(), [h[key] for h in hist])
        assert lines[key].get_marker() == "None"  # 50 points: no markers
    assert list(lines["target_negative_ce"].get_ydata()) == [4.5, 4.5]
    assert lines["target_negative_ce"].get_linestyle() == "--"
    assert _legend(ce)[0] == f"loss (last {hist[-1]['loss']:.4g})" and _legend(ce)[-1] == "target_negative_ce = 4.5"
    assert ce.get_yscale() == "log"  # CE falls over orders of magnitude
    assert ce.get_ylabel() == "cross-entropy (nats/token)" and guidance.get_ylabel() == "guidance term"
    assert guidance.get_xlabel() == "epoch" and fig.get_suptitle() == "run $1$"
    [term] = guidance.get_lines()
    assert np.allclose(term.get_ydata(), [h["guidance_term"] for h in hist])
    path = plots.plot_losses(hist, tmp_path / "a" / "b" / "loss.png", title="run $1$", target=4.5)
    assert path == tmp_path / "a" / "b" / "loss.png"
    fmt, (w, h), _ = _open(path)
    assert fmt == "PNG" and 400 <= w <= 2000 and 300 <= h <= 2000


def test_plot_losses_without_negative() -> None:
    # guidance 0: no ce_negative / guidance_term at all, or present but None
    hist = _history(5, with_negative=False)
    hist[2]["ce_negative"] = None  # type: ignore[assignment]
    fig = plots.draw_losses(hist)
    ce, guidance = fig.axes
    assert [line.get_label().split(" ")[0] for line in ce.get_lines()] == ["loss", "ce_positive"]
    assert all(line.get_marker() == "o" for line in ce.get_lines())  # a handful of points: markers
    assert ce.get_yscale() == "linear" and fig.get_suptitle() == ""
    assert not guidance.get_lines() and [t.get_text() for t in guidance.texts] == ["no guidance term recorded"]
    assert list(guidance.get_yticks()) == []


def test_plot_losses_single_epoch_and_gaps() -> None:
    hist = _history(4)
    hist[1]["loss"] = None  # type: ignore[assignment]
    del hist[3]["guidance_term"]
    ce, _ = plots.draw_losses(hist[:1], target=4.5).axes
    assert [len(line.get_ydata()) for line in ce.get_lines()[:3]] == [1, 1, 1]
    ce, guidance = plots.draw_losses(hist).axes
    loss = ce.get_lines()[0].get_ydata()
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2, 3]]).all()  # the line breaks at the gap
    assert np.isnan(guidance.get_lines()[0].get_ydata()[3])
    assert _legend(ce)[0] == f"loss (last {hist[3]['loss']:.4g})"


def test_plot_losses_with_nothing_recorded() -> None:
    ce, _ = plots.draw_losses([{"epoch": 0.0}]).axes
    assert not ce.get_lines() and [t.get_text() for t in ce.texts] == ["no losses recorded"]


def _heatmap_axes(fig):
    """The heatmap's axes and the colour bar's."""
    heat, bar = fig.axes
    return heat, bar


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid"])
def test_selection_heatmap(tmp_path: Path, act: str) -> None:
    x = np.random.default_rng(0).standard_normal((10, 32))
    sel = {"tanh": np.tanh(x), "relu": np.maximum(x, 0), "sigmoid": 1 / (1 + np.exp(-x))}[act]
    titles = [f"Article {i} $about$ something with a rather long title" for i in range(10)]
    fig = plots.draw_selection_heatmap(sel, titles, epoch=10)
    heat, bar = _heatmap_axes(fig)
    [image] = heat.images
    assert np.array_equal(image.get_array(), sel)
    vmax = np.abs(sel).max()  # symmetric about 0, spanning the largest |s|
    assert (image.norm.vmin, image.norm.vmax) == (-vmax, vmax) and image.get_cmap().name == "RdBu_r"
    assert heat.get_title() == (f"memory selection s_i (epoch 10)\n10 documents × 32 entries, "
                                f"range [{sel.min():.3g}, {sel.max():.3g}]")
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert len(labels) == 10 and labels[3].startswith("3: Article 3 $about$") and labels[3].endswith("…")
    assert [t.get_text() for t in heat.get_xticklabels()] == [str(j) for j in range(32)]
    assert (heat.get_xlabel(), heat.get_ylabel(), bar.get_ylabel()) == ("memory entry", "document", "selection s_i")
    path = plots.plot_selection_heatmap(sel, titles, tmp_path / "sel" / "heat.png", epoch=10)
    fmt, (w, h), _ = _open(path)
    assert fmt == "PNG" and 500 <= w <= 2500 and 200 <= h <= 2500


def test_selection_heatmap_many_docs_stays_small(tmp_path: Path) -> None:
    sel = np.random.default_rng(1).uniform(-1, 1, (500, 32))
    fig = plots.draw_selection_heatmap(sel, [f"doc {i}" for i in range(500)], epoch=0)
    heat, _ = _heatmap_axes(fig)
    shown = heat.images[0].get_array()
    assert shown.shape == (64, 32) and np.array_equal(shown[0], sel[0]) and np.array_equal(shown[-1], sel[-1])
    assert "showing 64 of 500 documents (evenly sampled)" in heat.get_title()
    assert heat.get_yticklabels()[-1].get_text() == "499: doc 499"
    w, h = fig.get_size_inches() * fig.dpi
    assert w <= 2500 and h <= 2500
    _, (w, h), _ = _open(plots.plot_selection_heatmap(sel, [f"doc {i}" for i in range(500)], tmp_path / "heat.png"))
    assert w <= 2500 and h <= 2500


@pytest.mark.parametrize("shape", [(1, 2), (3, 1), (4, 1024)])
def test_selection_heatmap_odd_shapes(tmp_path: Path, shape: tuple[int, int]) -> None:
    sel = np.zeros(shape)  # all-zero selections must not divide by zero in the colour scale
    heat, _ = _heatmap_axes(plots.draw_selection_heatmap(sel, ["x"] * shape[0]))
    norm = heat.images[0].norm
    assert (norm.vmin, norm.vmax) == (-1.0, 1.0) and heat.images[0].get_array().shape == shape
    if shape[1] <= 64:  # one tick per entry; more entries keep matplotlib's own ticks
        assert [t.get_text() for t in heat.get_xticklabels()] == [str(j) for j in range(shape[1])]
    path = plots.plot_selection_heatmap(sel, ["x"] * shape[0], tmp_path / "heat.png")
    _, (w, h), _ = _open(path)
    assert w <= 2500 and h <= 2500


def test_selection_heatmap_fixed_scale() -> None:
    heat, _ = _heatmap_axes(plots.draw_selection_heatmap(np.full((2, 3), 0.25), ["a", "b"], vmax=1.0))
    assert (heat.images[0].norm.vmin, heat.images[0].norm.vmax) == (-1.0, 1.0)


def test_selection_heatmap_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plots.plot_selection_heatmap(np.zeros(5), ["a"] * 5, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.plot_selection_heatmap(np.zeros((5, 2)), ["a"] * 4, tmp_path / "x.png")


def _cells(ax) -> list[str]:
    """A logit-lens block's cell texts in order: token, score, token, score, ... by column, then rank."""
    return [t.get_text() for t in ax.texts]


def test_logit_lens_awkward_tokens(tmp_path: Path) -> None:
    titles = ["Valkyria Chronicles III", "Cicely Mary Barker $5", "中文 title", "x\ny"]
    lens = _lens(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a missing glyph or a mathtext parse problem
        fig = plots.draw_logit_lens(lens, titles, epoch=3)
        path = plots.plot_logit_lens(lens, titles, tmp_path / "lens" / "lens.png", epoch=3)
    table, _ = fig.axes  # one block of 4 columns, and the colour bar
    assert fig.get_suptitle() == "logit lens: top-20 tokens of each document's memory readout (epoch 3)"
    headers = [t.get_text() for t in table.get_xticklabels()]
    # a title wraps at a column's width; a glyph the font lacks shows as ?, a line break as a space
    assert headers == ["Valkyria Chronicles\nIII\n#0", "Cicely Mary Barker $5\n#1", "?? title\n#2", "x y\n#3"]
    cells = _cells(table)
    charmap = plots._font_charmap(plots.TOKEN_FONT)
    column = [cells[2 * r: 2 * r + 2] for r in range(20)]  # column 0: document 0's tokens by rank
    assert column == [[plots._visible_token(tok, charmap), f"{score:.3g}"] for tok, score in lens[0]]
    scores = [score for doc in lens for _, score in doc]
    assert (table.images[0].norm.vmin, table.images[0].norm.vmax) == (min(scores), max(scores))
    fmt, (w, h), _ = _open(path)
    assert fmt == "PNG" and 300 <= w <= 3000 and 300 <= h <= 3000


def test_logit_lens_many_docs_and_ragged(tmp_path: Path) -> None:
    lens = _lens(40)
    lens[5] = lens[5][:3]  # fewer tokens than the others
    lens[7] = []
    fig = plots.draw_logit_lens(lens, [f"doc {i}" for i in range(40)], max_docs=16)
    *blocks, _ = fig.axes
    assert len(blocks) == 2  # 16 documents: two rows of 8 columns
    assert "showing 16 of 40 documents (evenly sampled)" in fig.get_suptitle()
    shown = [t.get_text().rsplit("#", 1)[1] for ax in blocks for t in ax.get_xticklabels()]
    assert shown[0] == "0" and shown[-1] == "39" and len(shown) == 16 and "5" in shown
    column = shown.index("5")
    cells = _cells(blocks[column // 8])[(column % 8) * 40:(column % 8 + 1) * 40]
    assert all(cells[:6]) and not any(cells[6:])  # three ranks filled, the rest blank
    path = plots.plot_logit_lens(lens, [f"doc {i}" for i in range(40)], tmp_path / "lens.png", max_docs=16)
    _, (w, h), _ = _open(path)
    assert w <= 3000 and h <= 3000


def test_visible_token() -> None:
    charmap = plots._font_charmap(plots.TOKEN_FONT)
    assert plots._visible_token("\n", charmap) == "\\n"
    assert plots._visible_token(" the", charmap) == "␣the"
    assert plots._visible_token("  ", charmap) == "␣␣"
    assert plots._visible_token("", charmap) == "∅"
    assert plots._visible_token("$", charmap) == "$"
    assert "\\u4e2d" in plots._visible_token("中", charmap)


def _frames(tmp_path: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    titles = [f"doc {i}" for i in range(6)]
    return [plots.plot_selection_heatmap(np.tanh(rng.standard_normal((6, 8)) * (e + 1)), titles,
                                         tmp_path / f"f{e}.png", epoch=e, vmax=1.0) for e in range(n)]


def test_make_gif(tmp_path: Path) -> None:
    frames = _frames(tmp_path, 4)
    path = plots.make_gif(frames, tmp_path / "gif" / "sel.gif", duration_ms=200)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 4
        assert im.info.get("loop") == 0
        with Image.open(frames[0]) as first:
            assert im.size == first.size
        pics = []
        for i in range(im.n_frames):
            im.seek(i)
            pics.append(im.convert("RGB"))
    assert all(ImageChops.difference(a, b).getbbox() is not None for a, b in zip(pics, pics[1:]))
    for frame, pic in zip(frames, pics):  # 256 colours a frame: the same picture to the eye
        error = np.abs(_pixels(frame).astype(int) - np.asarray(pic, dtype=int))
        assert error.mean() < 4 and error.max() <= 48


def test_make_gif_mixed_sizes(tmp_path: Path) -> None:
    sizes = [(200, 100), (210, 96), (150, 120)]
    frames = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"m{i}.png"
        Image.new("RGBA", size, (40 * i, 100, 200, 255)).save(p)
        frames.append(p)
    path = plots.make_gif(frames, tmp_path / "mixed.gif")
    with Image.open(path) as im:
        assert im.size == (200, 100) and im.n_frames == 3


def test_make_gif_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plots.make_gif([], tmp_path / "x.gif")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_kept_figures_draw_what_fresh_figures_draw(tmp_path: Path) -> None:
    """A summary keeps its figures and redraws only what changed: every frame must be pixel for pixel
    the picture a fresh figure draws (layout, autoscale, colour bar and legend included)."""
    titles = ["Valkyria Chronicles III", "Tower Building of the Little Rock Arsenal", "中文 $x$", "d", "e"]
    lens = [_lens(5, seed=s) for s in range(3)]
    lens[1][2] = lens[1][2][:4]  # a ragged frame between full ones
    lens[2] = [[(tok, 100 * score - 40) for tok, score in doc] for doc in lens[2]]  # another colour scale
    rng = np.random.default_rng(0)
    selections = [np.tanh(rng.standard_normal((5, 12))) * scale for scale in (0.2, 1.0, 3.0)]
    # 5 -> 40 epochs: markers go; the last history spans a log axis
    histories = [_history(5), _history(29), [dict(h, loss=h["loss"] / 50) for h in _history(40)]]
    table, heatmap, curves = None, None, None
    for e in range(3):
        fresh = [plots.plot_logit_lens(lens[e], titles, tmp_path / f"lens{e}.png", epoch=e),
                 plots.plot_selection_heatmap(selections[e], titles, tmp_path / f"sel{e}.png", epoch=e),
                 plots.plot_losses(histories[e], tmp_path / f"loss{e}.png", title=f"epoch {e}", target=4.5)]
        table = table or plots.LogitLensTable.for_tokens(lens[e], titles)
        heatmap = heatmap or plots.SelectionHeatmap(titles, 12)  # vmax None: the scale follows each frame
        curves = curves or plots.LossCurves(histories[e], target=4.5, title="epoch 0")
        assert table.fits(lens[e], titles) and curves.fits(histories[e], 4.5, f"epoch {e}")
        kept = [table.draw(lens[e], tmp_path / f"kept_lens{e}.png", epoch=e),
                heatmap.draw(selections[e], tmp_path / f"kept_sel{e}.png", epoch=e),
                curves.draw(histories[e], tmp_path / f"kept_loss{e}.png", title=f"epoch {e}")]
        for a, b in zip(fresh, kept):
            assert np.array_equal(_pixels(a), _pixels(b)), f"{b.name} differs from {a.name}"
    assert not np.array_equal(_pixels(tmp_path / "kept_lens0.png"), _pixels(tmp_path / "kept_lens1.png"))


def test_kept_figures_refuse_other_shapes(tmp_path: Path) -> None:
    table = plots.LogitLensTable.for_tokens(_lens(3), ["a", "b", "c"])
    assert not table.fits(_lens(3, k=5), ["a", "b", "c"]) and not table.fits(_lens(3), ["a", "b", "x"])
    with pytest.raises(ValueError):
        table.draw(_lens(3, k=5), tmp_path / "x.png")
    curves = plots.LossCurves(_history(3, with_negative=False))
    assert not curves.fits(_history(3))  # a guidance term appeared: other panels
    with pytest.raises(ValueError):
        plots.SelectionHeatmap(["a", "b"], 4).draw(np.zeros((2, 5)), tmp_path / "x.png")


def test_pictures_are_opaque_rgb_pngs(tmp_path: Path) -> None:
    path = plots.plot_losses(_history(3), tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (800, 600)
        assert round(im.info["dpi"][0]) == plots.DPI
