"""The comparison of methods: the prompt baseline's engine and text, the best-run rule, one report from
a keyed run, a per-document LoRA run and the prompt baseline, and `run.sh compare`'s refusals."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import ROOT
from docmem.baselines.prompt import PromptEngine, context_ids, training_text
from docmem.batching import make_batches
from docmem.config import parse_args
from docmem.engines import NO_MEMORY
from docmem.evaluation import methods_report
from docmem.run_folder import load_documents
from fixtures_memory import tiny_run  # noqa: F401  (fixture)
from fixtures_tiny import run_training, subprocess_env, tiny_argv, tiny_lm_dir  # noqa: F401  (fixture)
from foundations.placement import open_foundation
from utils import table_cell
from wikitext import Document, segment_article


def test_training_text_rebuilds_the_covered_words():
    words = [f"w{i}" for i in range(40)]
    segments = segment_article(" ".join(words), 8, 4)  # windows at 0, 4, 8, 12: words 0..19
    doc = Document(index=0, title="t", segments=segments, article_index=0)
    assert training_text(doc, 8) == " ".join(words[:20])
    assert training_text(Document(index=0, article_index=0, title="t", segments=segments[:1]), 8) == " ".join(words[:8])


def test_prompt_engine_scores_the_same_tokens_under_every_context(tiny_lm_dir, tmp_path):  # noqa: F811
    config = parse_args(tiny_argv(tiny_lm_dir, tmp_path))
    foundation = open_foundation(config, "cpu", torch.float32)
    documents = load_documents(config)
    contexts = context_ids(foundation.tokenizer, documents, config.segment_length)
    engine = PromptEngine(foundation, contexts)
    batch = make_batches(documents, foundation.tokenizer, config.batch_size, config.max_length)[0]
    plain, own, other = engine.losses(batch, [NO_MEMORY, 0, 1])
    assert len({plain.item(), own.item(), other.item()}) == 3  # the context is read (a random LM: no direction)
    # NO_MEMORY equals the plain LM's own token mean over the real tokens after each row's first
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].unsqueeze(0)
    logits = foundation.model(input_ids=ids).logits
    reference = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    alone = type(batch)(index=0, doc_ids=batch.doc_ids[:1], input_ids=ids, attention_mask=torch.ones_like(ids),
                        labels=ids)
    assert torch.allclose(engine.losses(alone, [NO_MEMORY])[0], reference, atol=1e-5)
    with pytest.raises(ValueError, match="document index"):
        engine.losses(batch, [torch.zeros(2)])


def summary(recall: float, ce: float) -> dict:
    return {"rougeL_recall": {"right_key": recall}, "ce": {"diagonal_mean": ce}}


def test_best_run_rule():
    runs = [{"run_dir": "a", "summary": summary(0.5, 2.0)}, {"run_dir": "b", "summary": summary(0.7, 3.0)},
            {"run_dir": "c", "summary": summary(0.7, 2.5)}]
    assert methods_report.pick_best(runs)["run_dir"] == "c"  # highest recall, then the lower CE
    shared = [{"run_dir": "s", "summary": {"rougeL_recall": {"memory": 0.2}, "ce": {"memory_mean": 1.0}}}]
    assert methods_report.pick_best(shared)["run_dir"] == "s"


def test_one_report_for_keyed_lora_and_prompt(tiny_run, tiny_lm_dir, tmp_path):  # noqa: F811
    done = run_training(tiny_argv(tiny_lm_dir, tmp_path / "lora", "--document_memory", "lora", "--precision", "fp32",
                                  num_epochs=2, save_freq=2))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "report"
    code = methods_report.main(["--out", str(out), "--method", "keyed", str(tiny_run), "--method", "lora",
                                str(tmp_path / "lora"), "--prompt_from", str(tmp_path / "lora"),
                                "--prompt_tokens", "8", "--new_tokens", "8", "--max_other_keys", "1"])
    assert code == 0
    report = json.loads((out / "methods.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert list(rows) == ["keyed", "lora", "prompt"]
    assert rows["prompt"]["context_tokens_per_query"] > 8 and rows["prompt"]["trainable_parameters"] == 0
    assert rows["lora"]["trainable_parameters"] == json.loads(
        (tmp_path / "lora" / "run_0" / "summary.json").read_text())["trainable_parameters"]
    for row in rows.values():
        for key in ("recall_right", "recall_other", "recall_plain_lm", "ce_diagonal", "ce_off_diagonal",
                    "attribution_training", "attribution_held_out"):
            assert row[key] is not None, (row["method"], key)
    text = (out / "methods.md").read_text()
    assert "keyed memory's" in text and "| prompt |" in text
    assert (out / "recall.png").is_file() and (out / "ce.png").is_file()


def test_unknown_method_is_refused(tmp_path, capsys):
    assert methods_report.main(["--out", str(tmp_path), "--method", "rag", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method" in err[0]
    done = subprocess.run(["bash", "run.sh", "compare"], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(COMPARE_METHODS="keyed rag", COMPARE_DIR=str(tmp_path / "c")))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "rag" in done.stderr
    assert not (tmp_path / "c").exists()  # refused before anything trained
    done = subprocess.run(["bash", "run.sh", "capacity"], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(CAPACITY_METHODS="lora rag", CAPACITY_DIR=str(tmp_path / "k")))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "rag" in done.stderr
    assert not (tmp_path / "k").exists()


def test_table_cell_formats_every_report_the_same_way():
    assert [table_cell(v) for v in (None, True, False, 0.12345, 1234.5, 1234, "a|b")] == [
        "–", "yes", "no", "0.123", "1234.500", "1234", "a|b"]
    assert [table_cell(v, 1, grouped=True) for v in (0.25, 1234.5, 1234567)] == ["0.2", "1,234", "1,234,567"]
    assert table_cell(None, none="-") == "-" and table_cell(2.0, 2) == "2.00"
