"""attribute.py and docmem/attribution.py on a tiny run: scores agree with the CE table of
evaluate_memory.py, the ranking is by CE, the evaluation's accounting, and one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import attribute
from docmem.attribution import (
    Scorer,
    TextScores,
    attribution_accuracy,
    evaluate_attribution,
    held_out_texts,
    score_texts,
    table_scores,
)
from docmem.engines import NO_MEMORY
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.options import EvalOptions
from docmem.run_folder import load_run
from docmem.trained_memory import load_memory_run
from fixtures_memory import exit_code, tiny_lm_dir, tiny_run  # noqa: F401


def test_scores_match_the_ce_table(tiny_run):  # noqa: F811
    run = load_run(tiny_run, EvalOptions(device="cpu"))
    table = CETable(run, run.documents, EvalOptions())
    keys = run.memory.doc_keys.detach()
    for doc in range(3):  # a document's segments scored as texts == its row of the CE matrix
        # (in training's batches, so the left padding, which shifts positions, is the same as there)
        # each segment as training saw it: its first max_length tokens (longer ones were truncated there)
        tok = run.foundation.tokenizer
        texts = [tok.decode(tok(seg)["input_ids"][: run.config.max_length]) for seg in run.documents[doc].segments]
        assert all(len(tok(t)["input_ids"]) <= run.config.max_length for t in texts)
        scores = score_texts(Scorer(run.foundation, run.memory, 2, run.dtype, run.config.max_length,
                                    rows_per_batch=run.config.batch_size, key_sets_per_pass=2,
                                    head_dtype=run.head_dtype), texts)
        tokens = np.array([s.tokens for s in scores])
        pooled = [float(np.dot([s.key_ce[j] for s in scores], tokens) / tokens.sum()) for j in range(3)]
        pooled += [float(np.dot([s.no_key for s in scores], tokens) / tokens.sum()),
                   float(np.dot([s.no_memory for s in scores], tokens) / tokens.sum())]
        expected = table.ce(doc, [keys[j] for j in range(3)] + [None, NO_MEMORY])
        assert pooled == pytest.approx(expected, rel=1e-4)


def test_long_text_is_windowed_and_ranking_is_by_ce(tiny_run):  # noqa: F811
    tm = load_memory_run(tiny_run, device="cpu")
    text = " ".join(["word"] * 300)
    (s,) = score_texts(Scorer(tm.foundation, tm.memory, tm.layer, tm.dtype, max_length=64), [text])
    n = len(tm.foundation.tokenizer(text)["input_ids"])
    # windows of 64 tokens score 63 targets each; the last, shorter one is left padded in the batch
    # and (as in training) its first token is a target too, predicted from the pad (= eos) before it
    full, rest = divmod(n, 64)
    assert full >= 2 and s.tokens == full * 63 + rest
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
    tok = run.foundation.tokenizer
    texts = [tok.decode(tok(seg)["input_ids"][: run.config.max_length]) for seg in run.documents[0].segments]
    alone = score_texts(Scorer(run.foundation, run.memory, 2, run.dtype, run.config.max_length,
                               rows_per_batch=run.config.batch_size, head_dtype=run.head_dtype), texts)
    assert len(from_table[0]) == len(texts)
    for t, s in zip(from_table[0], alone):
        assert t.tokens == s.tokens
        assert t.key_ce + [t.no_key, t.no_memory] == pytest.approx(s.key_ce + [s.no_key, s.no_memory], rel=1e-5)


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
