"""Every valid run, every command that reads it: a result, or a one-line refusal with a non-zero
exit, never a traceback.

The property test draws small valid runs (tests/valid_runs.py) on the tiny GPT-NeoX. Its example
count comes from the hypothesis profile: `ci` (the default, derandomised so CI is repeatable) or
`long` (DOCMEM_HYPOTHESIS_PROFILE=long, random draws, on demand).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from valid_runs import RunSpec, call, exercise, run_specs, write_articles

import evaluate_memory
import forget
import train_guidance
from fixtures_tiny import tiny_lm_dir  # noqa: F401  (fixture)

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("DOCMEM_HYPOTHESIS_PROFILE", "ci"))

# `prog: label: message`: the one line a refused command writes last (docmem/cli.py error_line)
REFUSAL = re.compile(r"^[\w.-]+: (error|stopped): \S.*$")


@given(spec=run_specs())
def test_every_command_on_a_valid_run_ends_in_a_result_or_a_one_line_refusal(spec, tiny_lm_dir):
    with tempfile.TemporaryDirectory() as folder:
        done = exercise(spec, tiny_lm_dir, Path(folder))
    for outcome in done.outcomes:
        assert "Traceback" not in outcome.stderr, (outcome.command, outcome.stderr[-3000:])
        if outcome.code:
            assert REFUSAL.match(outcome.refusal), (spec, outcome.command, outcome.stderr[-2000:])
    if done.outcomes[0].code == 0:  # the run trained: the commands that must work on any trained run did
        codes = {o.command: o.code for o in done.outcomes}
        assert codes["evaluate"] == 0 and codes["evaluate --compare"] == 0 and codes["resume"] == 0, (spec, codes)


# ---- the case that ended in a KeyError: a document with no prompt long enough ------------------

SHORT_DOC = RunSpec(article_words=(60, 60, 60, 60, 5), max_segments=2, segment_length=24, max_length=48,
                    batch_size=2, docs_per_step=1, memory_shards=1, document_memory="keyed",
                    negative_key_type="other", key_dim=2, num_epochs=4, seed=3)


def _train(tmp_path: Path, lm_dir: Path, spec: RunSpec = SHORT_DOC) -> Path:
    data = write_articles(tmp_path / "articles.txt", spec.article_words, spec.seed)
    trained = call("train", train_guidance.main, spec.argv(lm_dir, data, tmp_path / "runs"))
    assert trained.code == 0, trained.stderr[-3000:]
    return tmp_path / "runs" / "run_0"


def test_forgetting_a_run_with_a_document_that_has_no_prompt_gives_a_table(tiny_lm_dir, tmp_path):
    run = _train(tmp_path, tiny_lm_dir)
    titles = [d["title"] for d in json.loads((run / "memory" / "memory_config.json").read_text())
              ["provenance"]["documents"]]
    short = "Article 4"  # 5 words: fewer tokens than --prompt_tokens 32 + 1
    short_index = str(titles.index(short))
    first = "0" if short_index != "0" else "1"
    done = call("evaluate --forget", evaluate_memory.main, ["--run_dir", str(run), "--forget", first, "--grid", "3",
                                                            "--device", "cpu"])
    assert done.code == 0, done.stderr[-3000:]
    report = json.loads((run / "eval" / f"forget_doc_{int(first):02d}.json").read_text())
    for state in (report["before"], *report["after"].values()):
        missing = state["others_right_key"][short]
        assert missing["rougeL_recall"] is None and "--prompt_tokens 32" in missing["rougeL_recall_missing"]
        assert isinstance(missing["ce"], float)  # its CE is still measured
        recalled = [v for t, v in state["others_right_key"].items() if t != short]
        assert all(isinstance(v["rougeL_recall"], float) for v in recalled)
    assert all(isinstance(c, float) for c in report["others_recall_change_max"].values())
    table = (run / "eval" / f"forget_doc_{int(first):02d}.md").read_text()
    assert "| old key |" in table and "nothing to recall" not in table  # the document forgotten has prompts

    # forgetting the short document itself: its own recall is None everywhere, the table says why
    done = call("evaluate --forget short", evaluate_memory.main, ["--run_dir", str(run), "--forget", short_index,
                                                                  "--grid", "3", "--device", "cpu"])
    assert done.code == 0, done.stderr[-3000:]
    report = json.loads((run / "eval" / f"forget_doc_{int(short_index):02d}.json").read_text())
    assert report["plain_lm"]["rougeL_recall"] is None and report["before"]["document"]["old_key"]["rougeL_recall"] is None
    table = (run / "eval" / f"forget_doc_{int(short_index):02d}.md").read_text()
    assert "| old key | – (CE" in table and "nothing to recall" in table

    # the attack table with a forgotten memory: the short document's verbatim tokens are None, with the reason
    out = tmp_path / "forgotten"
    assert call("forget", forget.main, ["--run_dir", str(run), "--doc", short_index, "--method", "drop_key",
                                        "--out", str(out), "--device", "cpu"]).code == 0
    done = call("attack", evaluate_memory.main, ["--run_dir", str(run), "--forget", short_index, "--forgotten",
                                                 str(out), "--grid", "3", "--device", "cpu"])
    assert done.code == 0, done.stderr[-3000:]
    attack = json.loads((run / "eval" / f"forget_attack_doc_{int(short_index):02d}.json").read_text())
    assert attack["plain_lm"]["verbatim_tokens"] is None and attack["plain_lm"]["verbatim_tokens_missing"]
    assert attack["rows"]["before"]["others_right_key_recall"].keys() == set(titles) - {short}


def test_evaluation_says_why_a_document_has_no_recall(tiny_lm_dir, tmp_path):
    run = _train(tmp_path, tiny_lm_dir)
    done = call("evaluate", evaluate_memory.main, ["--run_dir", str(run), "--grid", "3", "--device", "cpu"])
    assert done.code == 0, done.stderr[-3000:]
    recall = json.loads((run / "eval" / "recall.json").read_text())
    short = next(d for d in recall["per_document"] if d["title"] == "Article 4")  # 5 words
    others = [d for d in recall["per_document"] if d is not short]
    assert short["scored_segments"] == 0 and "--prompt_tokens 32" in short["recall_missing"]
    assert all(v is None for v in short["conditions"].values())
    assert all("recall_missing" not in d and d["conditions"]["right_key"] for d in others)


def test_excluding_all_but_one_document_with_other_negatives_is_refused(tiny_lm_dir, tmp_path):
    spec = RunSpec(article_words=(40, 40), max_segments=1, segment_length=20, max_length=40, batch_size=1,
                   docs_per_step=1, memory_shards=1, document_memory="keyed", negative_key_type="other", key_dim=2,
                   num_epochs=1, seed=0)
    data = write_articles(tmp_path / "articles.txt", spec.article_words, spec.seed)
    done = call("train", train_guidance.main, [*spec.argv(tiny_lm_dir, data, tmp_path / "runs"), "--exclude_docs", "0"])
    assert done.code == 2 and "--exclude_docs '0': leaves one document" in done.refusal, done.stderr[-2000:]


def test_a_shared_memory_run_resumes(tiny_lm_dir, tmp_path):
    """Its initial evaluation has no negative CE (None), which the checkpoint check once refused."""
    spec = RunSpec(article_words=(40, 30), max_segments=1, segment_length=20, max_length=40, batch_size=1,
                   docs_per_step=1, memory_shards=1, document_memory="shared", negative_key_type="other", key_dim=2,
                   num_epochs=1, seed=0)
    run = _train(tmp_path, tiny_lm_dir, spec)
    done = call("resume", train_guidance.main, ["--resume", str(run), "--num_epochs", "2", "--summary_process", "off"])
    assert done.code == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
