"""--summary_process: a summary's pictures drawn by a helper process (docmem/pictures/summary_drawing.py) are the
same files as those drawn in the training process; the helper's failures reach the training as one
clear error; auto draws in the background on a GPU only; bad values are refused."""
from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest

import train_guidance
from docmem.config import TrainConfig
from docmem.errors import ConfigError
from docmem.pictures.summary_drawing import DrawingProcess, Frame, SummaryDrawingError, draws_in_background, serve
from fixtures_tiny import tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)

PICTURES = ("losses.png", "selection.png", "logit_lens.png")


def _run(lm_dir, save_dir, mode: str):
    argv = tiny_argv(lm_dir, save_dir, "--batch_size", "1", "--summary_process", mode, num_epochs=4, save_freq=2)
    assert train_guidance.main(argv) == 0
    return save_dir / "run_0"


def test_the_helper_draws_the_same_files_as_the_training_process(tiny_lm_dir, tmp_path):
    here, there = _run(tiny_lm_dir, tmp_path / "off", "off"), _run(tiny_lm_dir, tmp_path / "on", "on")
    for epoch in ("epoch_0002", "epoch_0004"):  # the second frame redraws the kept figures in both
        for name in PICTURES:
            a, b = here / "summaries" / epoch / name, there / "summaries" / epoch / name
            assert a.read_bytes() == b.read_bytes(), f"{epoch}/{name}"
    for gif in ("losses.gif", "docreps.gif", "logits.gif"):  # made from the helper's frames, after it finished
        assert (here / gif).read_bytes() == (there / gif).read_bytes(), gif
    summary = json.loads((there / "summary.json").read_text())
    assert summary["summary_seconds"] >= 0


def _frame(folder, **changes) -> Frame:
    fields = {"folder": str(folder), "epoch": 2, "history": [{"epoch": 1, "loss": 3.0, "ce_positive": 2.9,
                                                              "ce_negative": 4.1}],
              "target": 4.5, "selections": [[0.1, 0.9], [0.5, 0.2]], "titles": ["a", "b"],
              "top": [[["x", 1.5]], [["y", 0.5]]], "names": ["a", "b"]}
    return Frame(**{**fields, **changes})


def test_a_frame_that_cannot_be_drawn_is_reported_and_the_next_is_drawn(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    lines = [json.dumps(asdict(_frame(tmp_path / "a_file"))), json.dumps(asdict(_frame(tmp_path / "ok")))]
    answers = io.StringIO()
    serve(1.0, io.StringIO("\n".join(lines) + "\n"), answers)
    first, second = answers.getvalue().splitlines()
    assert first.split(":")[0].endswith("Error") and "a_file" in first and second == "ok"
    assert all((tmp_path / "ok" / name).is_file() for name in PICTURES)


def test_the_helper_process_reports_a_failure_as_one_error(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    process = DrawingProcess(None)
    process.submit(_frame(tmp_path / "ok"))
    process.submit(_frame(tmp_path / "a_file"))
    with pytest.raises(SummaryDrawingError, match="could not be drawn: .*Error.*a_file"):
        process.finish()
    assert process.proc.returncode == 0  # the helper itself ended normally once its input closed
    assert all((tmp_path / "ok" / name).is_file() for name in PICTURES)


def test_auto_draws_in_the_background_on_a_gpu_only():
    assert draws_in_background("auto", "cuda:0") and draws_in_background("on", "cpu")
    assert not draws_in_background("auto", "cpu") and not draws_in_background("off", "cuda")
    with pytest.raises(ConfigError, match="summary_process.*auto, on, off"):
        TrainConfig(summary_process="sometimes").validate()
