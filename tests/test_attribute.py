"""attribute.py and docmem/evaluation/attribution.py on a tiny run: a text scores the same alone or batched,
training segments are read from the CE table of evaluate_memory.py, the ranking is by CE, the
evaluation's accounting, and one-line errors."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import attribute
from docmem.batching import make_batches
from docmem.engines import NO_MEMORY, FastEngine
from docmem.evaluation.attribution import (
    Scorer,
    TextScores,
    attribution_accuracy,
    evaluate_attribution,
    held_out_texts,
    score_texts,
    table_scores,
)
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.options import EvalOptions
from docmem.run_folder import load_run
from docmem.trained_memory import load_memory_run
from fixtures_memory import exit_code, tiny_lm_dir, tiny_run  # noqa: F401


def test_a_text_scores_the_same_alone_or_batched(tiny_run):  # noqa: F811
    # every text scores its own tokens after the first, whatever else shares its batch (left padding
    # shifts only the positions: rounding)
    run = load_run(tiny_run, EvalOptions(device="cpu"))
    tok = run.foundation.tokenizer
    texts = [seg for doc in run.documents for seg in doc.segments] + ["A short text.", "Another one, a bit longer."]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 2 and max(lengths) <= 128  # one window each

    def scored(rows_per_batch: int) -> list:
        return score_texts(Scorer(run.foundation, run.memory, 2, run.dtype, 128,
                                  rows_per_batch=rows_per_batch, key_sets_per_pass=2), texts)

    batched, alone = scored(len(texts)), scored(1)
    assert [s.tokens for s in batched] == [s.tokens for s in alone] == [n - 1 for n in lengths]
    for b, a in zip(batched, alone):
        assert b.key_ce + [b.no_key, b.no_memory] == pytest.approx(a.key_ce + [a.no_key, a.no_memory], rel=1e-5)


def test_long_text_is_windowed_and_ranking_is_by_ce(tiny_run):  # noqa: F811
    tm = load_memory_run(tiny_run, device="cpu")
    text = " ".join(["word"] * 300)
    (s,) = score_texts(Scorer(tm.foundation, tm.memory, tm.layer, tm.dtype, max_length=64), [text])
    n = len(tm.foundation.tokenizer(text)["input_ids"])
    # windows of 64 tokens score 63 targets each, the last, shorter one its tokens after the first
    full, rest = divmod(n, 64)
    assert full >= 2 and rest >= 2 and s.tokens == full * 63 + rest - 1
    assert s.ranking() == sorted(range(3), key=lambda j: s.key_ce[j])
    with pytest.raises(ValueError, match="empty"):
        score_texts(Scorer(tm.foundation, tm.memory, tm.layer, tm.dtype, 64), ["  "])


def test_accuracy_accounting():
    scores = [TextScores(5, [1.0, 2.0], 3.0, 4.0), TextScores(5, [1.0, 0.5], 3.0, 0.7), TextScores(5, [3, 2], 3, 1)]
    out = attribution_accuracy(["a", "b", "c"], [0, 1, 0], scores)
    assert out["correct"] == 2 and out["top1_accuracy"] == pytest.approx(2 / 3)
    assert out["mean_rank"] == pytest.approx(4 / 3) and out["right_key_below_plain_lm"] == 2


def test_held_out_texts_start_after_the_trained_words():
    words = [f"w{i}" for i in range(100)]
    # 2 segments of 32 words, stride 16: words 0..47 trained; the rest in pieces of 32 (last: 20 words)
    pieces = held_out_texts(" ".join(words), 2, 32, 10)
    assert [p.split()[0] for p in pieces] == ["w48", "w80"] and len(pieces[1].split()) == 20
    assert held_out_texts(" ".join(words[:20]), 1, 32, 10) == []  # a one-segment article has no rest
    assert held_out_texts(" ".join(words[:52]), 2, 32, 10) == []  # a 4-word tail is too short


def test_training_segments_are_scored_from_the_ce_table(tiny_run):  # noqa: F811
    # each training segment's scores read from the CE table == the segment scored as a text in its
    # training batch; and reading them runs no pass the CE matrix has not run
    run = load_run(tiny_run, EvalOptions(device="cpu"))
    table = CETable(run, run.documents, EvalOptions())
    keys = run.memory.doc_keys.detach()
    table.ce(0, [keys[j] for j in range(3)] + [None, NO_MEMORY])  # document 0's CE matrix row
    passes = []
    table.engine.losses = (lambda original: lambda *a, **k: passes.append(1) or original(*a, **k))(table.engine.losses)
    from_table = table_scores(table, run.documents[:1], [keys[j] for j in range(3)], no_key=None)
    assert passes == []
    # what training computes for each row of document 0's batch, one column at a time on a fresh engine
    (batch,) = [b for b in make_batches(run.documents, run.foundation.tokenizer, run.config.batch_size,
                                        run.config.max_length) if int(b.doc_ids[0]) == 0]
    rows = replace(batch, chunk_of_row=torch.arange(batch.input_ids.shape[0]))
    engine = FastEngine(run.foundation, run.memory, 2, run.dtype, head_dtype=run.head_dtype)
    with torch.no_grad():
        expected = [engine.losses(rows, [c.expand(len(rows.doc_ids), -1) if isinstance(c, torch.Tensor) else c],
                                  per_document=True)[0] for c in [keys[j] for j in range(3)] + [None, NO_MEMORY]]
    assert len(from_table[0]) == len(run.documents[0].segments) == len(rows.doc_ids)
    for r, t in enumerate(from_table[0]):
        assert t.tokens == int((rows.labels[r, 1:] != -100).sum())
        assert t.key_ce + [t.no_key, t.no_memory] == pytest.approx([float(e[r]) for e in expected], rel=1e-6)


def test_evaluation_on_the_tiny_run(tiny_run):  # noqa: F811
    run = load_run(tiny_run, EvalOptions(device="cpu"))
    table = CETable(run, run.documents, EvalOptions())
    result = evaluate_attribution(run, run.documents, 16, 16, table)
    assert result["training_segments"]["texts"] == 6
    assert result["held_out"]["texts"] > 0
    assert all(0 <= result[k]["top1_accuracy"] <= 1 for k in ("training_segments", "held_out"))


def test_cli_text_file_and_json(tiny_run, tmp_path, capsys):  # noqa: F811
    tm = load_memory_run(tiny_run, device="cpu")
    assert attribute.main(["--run_dir", str(tiny_run), "--text", tm.titles[1] + " was founded", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "tokens; mean token CE" in out[0] and len(out) == 2 + 2 + 2
    (tmp_path / "t.txt").write_text("The society met in the town hall.")
    assert attribute.main(["--run_dir", str(tiny_run), "--file", str(tmp_path / "t.txt"), "--json", "--top", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    ces = [r["ce"] for r in result["ranking"]]
    assert len(ces) == 3 and ces == sorted(ces) and result["no_memory_ce"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--text", ""], "the text is empty"),
    (["--text", "   \n"], "the text is empty"),
    (["--file", "/nonexistent.txt"], "no such file"),
    (["--text", "a", "--top", "-1"], "--top -1"),
    ([], "one of the arguments --text --file is required"),
])
def test_errors_are_one_line_exit_2(tiny_run, tmp_path, capsys, argv, message):  # noqa: F811
    code = exit_code(attribute.main, ["--run_dir", str(tiny_run), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("attribute.py: error: ") and message in err[0], err


def test_empty_file_and_bad_run_folder(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "run").mkdir()
    for argv in (["--run_dir", str(tmp_path / "run"), "--file", str(tmp_path / "empty.txt")],
                 ["--run_dir", str(tmp_path / "run"), "--text", "some text"],
                 ["--run_dir", str(tmp_path / "missing"), "--text", "some text"]):
        assert attribute.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attribute.py: error: "), err
