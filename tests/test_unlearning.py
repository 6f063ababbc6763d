"""Approximate forgetting (forget.py --method unlearn), the key-search attack, and evaluate_memory.py
--forget's attack table against a reference run trained without the document."""
from __future__ import annotations

import json

import evaluate_memory as em
import forget as forget_cli
from docmem.evaluation.ce_table import CETable
from docmem.evaluation.options import EvalOptions
from docmem.key_attack import AttackSettings, attack, attack_starts
from docmem.run_folder import load_run
from fixtures_memory import copy_run, exit_code, tiny_lm_dir, tiny_run  # noqa: F401
from fixtures_tiny import run_training, tiny_argv


def test_the_attack_descends_and_never_ends_above_its_starts(tiny_run):  # noqa: F811
    run = load_run(tiny_run)
    table = CETable(run, run.documents, EvalOptions())
    keys = run.memory.doc_keys.detach()
    settings = AttackSettings(steps=4, lr=0.2, random_starts=2, grid=2)
    starts, labels = attack_starts(keys[0], keys, settings)
    assert labels[0] == "old_key" and starts.shape == (1 + 3 + 2 + 4, keys.shape[1])
    found = attack(table.engine, table.by_doc[0], starts, labels, settings)
    assert found.best_ce <= min(found.start_ce) + 1e-6
    assert abs(found.start_ce[0] - table.ce(0, [keys[0]])[0]) < 1e-4  # the old key's start is its CE
    assert found.best_ce < min(found.start_ce[4:])  # descent improves on the random starts


def test_unlearn_then_the_attack_table(tiny_run, tiny_lm_dir, tmp_path):  # noqa: F811
    run = copy_run(tiny_run, tmp_path)
    out = tmp_path / "unlearned"
    assert forget_cli.main(["--run_dir", str(run), "--doc", "0", "--method", "unlearn", "--steps", "3",
                            "--out", str(out), "--device", "cpu"]) == 0
    config = json.loads((out / "memory_config.json").read_text())
    assert config["num_docs"] == 2 and config["provenance"]["forgotten"][-1]["method"] == "unlearn"
    ref = run_training(tiny_argv(tiny_lm_dir, tmp_path / "ref", "--lr", "3e-2", "--exclude_docs", "0",
                                 num_epochs=4, save_freq=4))
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert em.main(["--run_dir", str(run), "--forget", "0", "--reference", str(tmp_path / "ref" / "run_0"),
                    "--forgotten", str(out), "--grid", "3", "--new_tokens", "8", "--prompt_tokens", "8"]) == 0
    report = json.loads((run / "eval" / "forget_attack_doc_00.json").read_text())
    assert set(report["rows"]) == {"before", "unlearn"} and "attack_ce" in report["reference"]
    before = report["rows"]["before"]
    assert before["attack_ce"] <= before["old_key_ce"] + 1e-6
    assert report["rows"]["unlearn"]["old_key_ce"] > before["old_key_ce"]
    assert (run / "eval" / "forget_attack_doc_00.md").read_text().count("\n| ") == 4  # header, rule, 2 rows
    assert exit_code(forget_cli.main, ["--run_dir", str(run), "--doc", "7", "--method", "unlearn"]) == 2
