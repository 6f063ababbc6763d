"""The periodic summaries: their figures built once and kept, the GIFs built once from the frames on disk
(at the end of training, on a stop), never redrawn at each summary, and whole after an interrupted and
resumed run; the logit lens's product."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from PIL import Image, ImageChops

import train_guidance
from docmem.pictures import plots
from fixtures_tiny import tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)
from utils import logit_lens

GIFS = ("losses.gif", "docreps.gif", "logits.gif")


def argv(lm_dir, save_dir) -> list[str]:
    # 6 batches an epoch (3 documents x 2 segments, batch size 1); summaries at epochs 2 and 4
    return tiny_argv(lm_dir, save_dir, "--batch_size", "1", num_epochs=4, save_freq=2)


def frames(run_dir) -> dict[str, int]:
    out = {}
    for name in GIFS:
        with Image.open(run_dir / name) as im:
            out[name] = im.n_frames
    return out


def counted(cls: type, built: list[str]) -> type:
    """`cls`, noting each figure it builds in `built`."""
    class Counted(cls):
        def __init__(self, *args, **kwargs) -> None:
            built.append(cls.__name__)
            super().__init__(*args, **kwargs)
    return Counted


def test_gifs_are_built_once_with_one_frame_per_summary(tiny_lm_dir, tmp_path, monkeypatch):
    built, figures = [], []
    real = plots.make_gif
    monkeypatch.setattr(plots, "make_gif", lambda paths, path, **kw: built.append(len(paths)) or real(paths, path, **kw))
    for name in ("LossCurves", "SelectionHeatmap", "LogitLensTable"):
        monkeypatch.setattr(plots, name, counted(getattr(plots, name), figures))
    assert train_guidance.main(argv(tiny_lm_dir, tmp_path / "runs")) == 0
    run_dir = tmp_path / "runs" / "run_0"
    assert built == [2, 2, 2]  # one build per GIF at the end, none per summary
    assert sorted(figures) == ["LogitLensTable", "LossCurves", "SelectionHeatmap"]  # built once, kept for summary 2
    assert frames(run_dir) == dict.fromkeys(GIFS, 2)
    for picture in ("losses.png", "selection.png", "logit_lens.png"):  # both summaries drew their own frame
        with Image.open(run_dir / "summaries" / "epoch_0002" / picture) as a, \
                Image.open(run_dir / "summaries" / "epoch_0004" / picture) as b:
            assert a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox()
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.parametrize("summary_process", ["off", "on"])
def test_gifs_after_a_stop_and_after_the_resume(tiny_lm_dir, tmp_path, monkeypatch, summary_process):
    """With the helper process too: the stop waits for its frame, which the GIFs then hold."""
    real, calls = train_guidance.train_step_losses, []

    def stop_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:  # epoch 3, batch 3: after the epoch-2 summary
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_guidance, "train_step_losses", stop_in_epoch_3)
    with pytest.raises(SystemExit) as exit_info:
        train_guidance.main([*argv(tiny_lm_dir, tmp_path / "runs"), "--summary_process", summary_process])
    assert exit_info.value.code == 143
    run_dir = tmp_path / "runs" / "run_0"
    assert frames(run_dir) == dict.fromkeys(GIFS, 1)  # written on the stop, with the summary so far

    monkeypatch.undo()
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    assert frames(run_dir) == dict.fromkeys(GIFS, 2)  # the earlier session's frame, from disk, and the new one


class _IdTokenizer:
    def decode(self, ids: list[int]) -> str:
        return str(ids[0])


class _WrappedHead(torch.nn.Module):
    """A head that is not a plain Linear (as a wrapped or adapted one): the lens calls its forward."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear, self.weight = linear, linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_logit_lens_fast_product_matches_the_head():
    """The lens multiplies (V, d) @ (d, n) for a plain bias-free Linear head: the same top tokens and
    logits (up to float rounding) as the head's own forward, which any other head keeps."""
    torch.manual_seed(0)
    head, norm, readouts = torch.nn.Linear(64, 1000, bias=False), torch.nn.LayerNorm(64), torch.randn(5, 64)
    expected = head(norm(readouts)).topk(7, dim=-1)
    for lens_head in (head, _WrappedHead(head)):
        top = logit_lens(readouts, norm, lens_head, _IdTokenizer(), top_k=7)
        assert [[int(tok) for tok, _ in row] for row in top] == expected.indices.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in row] for row in top]), expected.values, atol=1e-5)
